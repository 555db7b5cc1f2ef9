"""The seeded mutation fuzzer against the public endpoint (validating front + real tritonserver, tiny model), bounded
in count and time: nothing crashes or restarts, after every batch the server is live and ready, a normal request
returns the same bytes for the same seed, and RSS stays bounded (``serving.fuzz.fuzz_endpoint`` asserts those).
The longer run is ``bench/fuzz_serve.py`` (figures in the README)."""

from __future__ import annotations

import pytest

from serving.fuzz import Fuzzer, fuzz_endpoint

SEED = 17
ANSWERS = {"http:400", "http:403", "http:404", "http:405", "http:413", "http:415", "closed",
           "grpc:INVALID_ARGUMENT", "grpc:NOT_FOUND", "grpc:RESOURCE_EXHAUSTED", "grpc:UNIMPLEMENTED",
           "grpc:PERMISSION_DENIED", "grpc:OK", "http:200",
           "grpc:stream-error"}  # the model's own refusal of a value, inside a stream (Triton's way)


def test_cases_are_reproducible_from_seed_and_index():
    a, b = Fuzzer("127.0.0.1:1", "127.0.0.1:2", seed=SEED), Fuzzer("127.0.0.1:1", "127.0.0.1:2", seed=SEED)
    assert [(c.mutation, c.data) for c in map(a.case, range(200))] == \
        [(c.mutation, c.data) for c in map(b.case, range(200))]
    other = Fuzzer("127.0.0.1:1", "127.0.0.1:2", seed=SEED + 1)
    assert [c.data for c in map(a.case, range(50))] != [c.data for c in map(other.case, range(50))]
    families = {a.case(i).mutation.split(".")[0] for i in range(400)}
    assert families == {"json", "http", "binary", "grpc", "grpc-stream"}
    with pytest.raises(ValueError, match="loopback"):
        Fuzzer("10.0.0.1:8000", "127.0.0.1:2")


@pytest.mark.slow
def test_fuzzing_the_endpoint_crashes_nothing(endpoint):
    result = fuzz_endpoint(endpoint, seed=SEED, cases=600, seconds=60, batch=50, rss_growth_limit=256 << 20)
    assert result["crashes"] == 0 and result["restarts"] == 0 and not result["failures"], result
    assert result["cases"] >= 200 and result["mutations"] >= 40, result  # it really tried (bounded by time)
    unexpected = set(result["outcomes"]) - ANSWERS
    assert not unexpected, f"answers other than a refusal or a result: {unexpected} in {result['outcomes']}"
    refused = result["refused_by_reason"]
    for reason in ("shape", "datatype", "binary", "json", "duplicate_input", "unknown_input", "parameters"):
        assert refused.get(reason, 0) > 0, f"no case was refused for {reason!r}: {refused}"
    assert result["same_bytes_checks"] == result["batches"] >= 4
