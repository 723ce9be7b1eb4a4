-- A transition that ends or changes a task's jobs deletes them by task id;
-- without this index every such delete read the whole jobs table.
CREATE INDEX jobs_task ON jobs (task_id);
