-- wrk script: POST a ~1 KiB xhuoapi success callback to a different task's URL each time.
-- The URL list (one path per line) comes from the file named by BENCH_URLS; a run starts at
-- line BENCH_START, so successive runs post to tasks no earlier run has touched.
local urls = {}
for line in io.lines(os.getenv("BENCH_URLS")) do urls[#urls + 1] = line end
local start = tonumber(os.getenv("BENCH_START") or "0")
local next_thread = 0
function setup(thread)
  thread:set("offset", next_thread)
  next_thread = next_thread + 1
end
local counter
local step = tonumber(os.getenv("BENCH_THREADS") or "2")
function init(args) counter = start + offset end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
function request()
  counter = counter + step
  return wrk.format(nil, urls[(counter % #urls) + 1])
end
