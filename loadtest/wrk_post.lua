-- wrk script for `deebert bench`'s cross-check: POST /v1/classify with JSON bodies.
-- Bodies: one JSON object per line of the file named by DEEBERT_WRK_BODIES, sent in turn, so wrk sends
-- the same kind of texts as `deebert loadtest`; a fixed text when the variable is unset.
-- DEEBERT_WRK_THRESHOLD, when set, goes in the X-Exit-Threshold header.
--   DEEBERT_WRK_BODIES=bodies.jsonl DEEBERT_WRK_THRESHOLD=0 \
--     wrk -t1 -c32 -d5s --latency -s loadtest/wrk_post.lua http://127.0.0.1:8000/v1/classify
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threshold = os.getenv("DEEBERT_WRK_THRESHOLD")
if threshold ~= nil and threshold ~= "" then
  wrk.headers["X-Exit-Threshold"] = threshold
end

local bodies = {}
local path = os.getenv("DEEBERT_WRK_BODIES")
if path ~= nil and path ~= "" then
  for line in io.lines(path) do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
end
if #bodies == 0 then
  bodies[1] = '{"texts": ["a gripping, beautifully acted film"]}'
end

local index = 0
request = function()
  index = index % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[index])
end
