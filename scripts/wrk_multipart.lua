-- wrk script for scripts/bench_serve.py: POST one image as a multipart upload (part `image`), back to back.
--   wrk -t1 -c16 -d10s -s scripts/wrk_multipart.lua http://127.0.0.1:3000/classify -- image.png
-- Prints one JSON line at the end: request count, duration, errors, latency percentiles (microseconds).

local boundary = "cltvit-bench-boundary"

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  wrk.body = "--" .. boundary .. "\r\n"
    .. "Content-Disposition: form-data; name=\"image\"; filename=\"image.png\"\r\n"
    .. "Content-Type: image/png\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "err_connect": %d, "err_read": %d, "err_write": %d, '
    .. '"err_status": %d, "err_timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
