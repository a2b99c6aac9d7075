"""The OpenAI-compatible images API without Ray: request parsing and validation
(``image_api.openai_job``), the answers checked against the ``openai`` package's own response
types, and the real ``openai`` client talking to those functions through an in-process HTTP
transport (the wire format both ways). tests/test_serve.py runs the same client against the Ray
Serve app over real HTTP."""

import base64
import json

import httpx2
import openai
import pytest
import torch
from openai.types import ImagesResponse, Model

from nitro_dist.image_api import (
    SEED_MAX,
    Job,
    Limits,
    OpenAIError,
    Result,
    encode_png,
    model_name_of,
    models_list,
    openai_images_response,
    openai_job,
    parse_size,
    result_headers,
)

# the digits model's limits (Limits.of its Generator): trained at 8 px, multiples of 2 from 4 to
# 16, 16 text tokens
LIMITS = Limits(native=8, multiple=2, min_side=4, max_side=16, max_tokens=16, channels=1)
NAME = "digits"
PROMPT = "a handwritten digit three"


def job_of(body: dict | bytes, random_seed: int = 99) -> Job:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return openai_job(data, LIMITS, NAME, random_seed)


def test_a_request_becomes_the_job_v1_images_would_run():
    body = {
        "model": NAME,
        "prompt": PROMPT,
        "n": 2,
        "size": "8x16",  # WIDTHxHEIGHT
        "response_format": "b64_json",
        "user": "someone",
        "steps": 2,
        "seed": 3,
    }
    # /v1/images {"prompt", "steps": 2, "seed": 3, "num_images": 2, "height": 16, "width": 8}
    assert job_of(body) == Job(PROMPT, 2, 3, 2, 16, 8, model=NAME)  # the model it names
    # defaults: the served model, 1 step, 1 image at the training size, the random seed given
    assert job_of({"prompt": PROMPT}, random_seed=41) == Job(PROMPT, 1, 41, 1, 8, 8)
    for size in ("auto", None):
        assert job_of({"prompt": PROMPT, "size": size, "n": None}).num_images == 1
        job = job_of({"prompt": PROMPT, "size": size})
        assert (job.height, job.width) == (LIMITS.native, LIMITS.native)
    assert parse_size("16x8", LIMITS) == (8, 16)  # (height, width)
    assert job_of({"prompt": PROMPT, "n": 2, "seed": SEED_MAX - 1}).seed == SEED_MAX - 1


BAD = [  # body, status, param, words in the message
    (
        {"prompt": PROMPT, "response_format": "url"},
        400,
        "response_format",
        "'url' is not supported",
    ),
    ({"prompt": PROMPT, "response_format": "png"}, 400, "response_format", "use 'b64_json'"),
    ({"prompt": PROMPT, "size": "8"}, 400, "size", "not WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "8x"}, 400, "size", "not WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "axb"}, 400, "size", "not WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "8X8"}, 400, "size", "not WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "\uff18x8"}, 400, "size", "not WIDTHxHEIGHT"),  # fullwidth 8
    ({"prompt": PROMPT, "size": "-8x8"}, 400, "size", "not WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "9x8"}, 400, "size", "width: 9 is not allowed"),
    ({"prompt": PROMPT, "size": "8x32"}, 400, "size", "height: 32 is not allowed"),
    ({"prompt": PROMPT, "size": "2x8"}, 400, "size", "width: 2 is not allowed"),
    ({"prompt": PROMPT, "size": "1024x1024"}, 400, "size", "from 4 to 16"),
    ({"prompt": PROMPT, "size": 8}, 400, "size", "valid string"),
    ({"prompt": PROMPT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": PROMPT, "n": 9}, 400, "n", "less than or equal to 8"),
    ({"prompt": PROMPT, "n": "2"}, 400, "n", "valid integer"),
    ({"prompt": PROMPT, "steps": 5}, 400, "steps", "less than or equal to 4"),
    ({"prompt": PROMPT, "steps": 0}, 400, "steps", "greater than or equal to 1"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": PROMPT, "seed": SEED_MAX, "n": 2}, 400, "seed", "seed + n - 1"),
    ({"prompt": PROMPT, "quality": "hd"}, 400, "quality", "unsupported parameter"),
    ({"prompt": PROMPT, "num_images": 2}, 400, "num_images", "supported: prompt, model, n"),
    ({"prompt": ""}, 400, "prompt", "at least 1 character"),
    ({"prompt": "   "}, 400, "prompt", "must not be empty or only spaces"),
    ({"prompt": "x" * 2001}, 400, "prompt", "at most 2000"),
    ({"n": 1}, 400, "prompt", "required parameter missing"),
    ({"prompt": PROMPT, "model": 3}, 400, "model", "valid string"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 404, "model", "this server serves: digits"),
    (b'{"prompt": "a handwritten digit one", ', 400, None, "body: malformed JSON"),
    (b"\xff\xfe", 400, None, "body: malformed JSON"),
    (b"", 400, None, "body: malformed JSON"),
    (b"[1, 2]", 400, None, "body: expected a JSON object, got list"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD)
def test_bad_requests_get_openai_errors_naming_the_parameter(body, status, param, words):
    with pytest.raises(OpenAIError) as info:
        job_of(body)
    err = info.value
    assert (err.status, err.param) == (status, param), err.body()
    assert words in err.message, err.message
    assert err.message.startswith(param or "body"), err.message
    assert err.body() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": "model_not_found" if status == 404 else None,
        }
    }


def fake_result(job: Job) -> Result:
    """What run_jobs answers for ``job``, with images drawn from the seeds (no model needed)."""
    pngs = []
    for seed in range(job.seed, job.seed + job.num_images):
        g = torch.Generator().manual_seed(seed)
        pngs.append(encode_png(torch.rand(1, job.height, job.width, generator=g) * 2 - 1))
    seeds = list(range(job.seed, job.seed + job.num_images))
    return Result(pngs=pngs, seeds=seeds, prompt_tokens=20, truncated=True, batch_images=2)


def test_answers_are_openai_response_types():
    job = Job(PROMPT, 2, 3, 2, 16, 8)
    result = fake_result(job)
    body = openai_images_response(result, job, created=1_700_000_000)
    parsed = ImagesResponse.model_validate(body)
    assert parsed.created == 1_700_000_000 and parsed.size == "8x16"
    assert parsed.data is not None
    assert [base64.b64decode(d.b64_json or "") for d in parsed.data] == result.pngs
    assert all(d.revised_prompt is None and d.url is None for d in parsed.data)
    assert json.loads(json.dumps(body)) == body  # plain JSON
    (card,) = models_list(NAME, 123)["data"]
    assert Model.model_validate(card) == Model(
        id=NAME, object="model", created=123, owned_by="nitro_dist"
    )
    headers = result_headers(result, job.steps, LIMITS.max_tokens)
    assert headers["X-Seeds"] == "3,4" and headers["X-Steps"] == "2"
    assert "read the first 16" in headers["X-Prompt-Truncated"]


def test_model_is_named_after_the_run():
    assert model_name_of("/runs/digits/checkpoints/iter_000600") == "digits"
    assert model_name_of("/runs/digits/checkpoints/iter_000600/") == "digits"
    assert model_name_of("s3://bucket/nitro_runs/sdxl_realism/iter_000100") == "sdxl_realism"
    assert model_name_of("/exports/my_generator") == "my_generator"
    with pytest.raises(ValueError, match="pass model_name="):
        model_name_of("s3://iter_000100")


def openai_client() -> openai.OpenAI:
    """The real ``openai`` client; its HTTP requests are answered in-process by the functions
    ``nitro_dist.image_app.ImageApp`` calls."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if request.method == "GET" and path == "/v1/models":
            return httpx2.Response(200, json=models_list(NAME, 123))
        assert (request.method, path) == ("POST", "/v1/images/generations"), path
        try:
            job = openai_job(request.content, LIMITS, NAME, random_seed=7)
        except OpenAIError as e:
            return httpx2.Response(e.status, json=e.body())
        result = fake_result(job)
        headers = result_headers(result, job.steps, LIMITS.max_tokens)
        return httpx2.Response(200, json=openai_images_response(result, job, 1), headers=headers)

    http = httpx2.Client(transport=httpx2.MockTransport(answer))
    return openai.OpenAI(
        base_url="http://nitro.test/v1", api_key="unused", http_client=http, max_retries=0
    )


def test_the_openai_client_speaks_this_api():
    client = openai_client()
    (model,) = client.models.list().data
    assert model.id == NAME
    raw = client.images.with_raw_response.generate(
        model=NAME,
        prompt=PROMPT,
        n=2,
        size="16x8",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2},  # this server's extra parameters
    )
    assert raw.headers["X-Seeds"] == "3,4" and raw.headers["X-Steps"] == "2"
    out = raw.parse()
    assert out.size == "16x8" and out.data is not None
    pngs = [base64.b64decode(d.b64_json or "") for d in out.data]
    assert pngs == fake_result(Job(PROMPT, 2, 3, 2, 8, 16)).pngs
    assert len(client.images.generate(prompt=PROMPT).data or []) == 1  # defaults, random seed
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model=NAME, prompt=PROMPT, response_format="url")
    assert bad.value.status_code == 400 and bad.value.param == "response_format"
    assert (
        isinstance(bad.value.body, dict) and "'url' is not supported" in bad.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model=NAME, prompt=PROMPT, size="1024x1024")
    assert bad.value.param == "size" and "from 4 to 16" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model=NAME, prompt=PROMPT, quality="hd")
    assert bad.value.param == "quality"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt=PROMPT)
    assert missing.value.code == "model_not_found" and "serves: digits" in missing.value.message
