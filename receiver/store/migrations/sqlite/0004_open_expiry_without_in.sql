-- The partial index's condition is evaluated for the old and the new row on every update of a
-- task's state, i.e. on every callback. Written as `state IN ('queued', 'submitted', 'running')`
-- SQLite evaluated it by building a temporary b-tree of the three values, twice per update (a
-- tenth of the writer's instructions per callback); the same condition as equalities joined by
-- OR is three comparisons. Queries that read this index must spell the condition the same way.
DROP INDEX tasks_open_expiry;
CREATE INDEX tasks_open_expiry ON tasks (expires_at)
    WHERE state = 'queued' OR state = 'submitted' OR state = 'running';
