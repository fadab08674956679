"""Request bodies of /classify, /explain and /embed -> `ImageRequest`, in one parse, or a `RequestError`.

Two encodings are accepted (docs/serving.md):
- multipart/form-data: one file part `image`; optional text parts `labels` (a JSON list or a
  comma-separated string), `top_k`, for /explain `spatial` / `heads` / `total_effect` (true / false), for
  /intervene `edits` (a JSON list of edit sets, required) and `check_linearity`.
- JSON object: `{"image": "<base64 or data: URL>", "labels": [...], "top_k": 3, "heads": true}`.
The whole body is already in memory (the guard read it under the size limit); parts are kept as
bytes, never written to temporary files. JSON goes through pydantic-core's parser, whose nesting
limit refuses pathologically deep documents at once. No URL is ever fetched.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import bentoml
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse

from .intervene import MAX_EDIT_SETS
from .runtime import MAX_LABEL_CHARS, MAX_LABELS, LabelError, validate_labels
from .schemas import EditSet

MAX_TOP_K = 1000
MAX_PARTS = 16
IMAGE_HINT = "send a multipart file part 'image' or JSON {\"image\": \"<base64>\"}"


class RequestError(Exception):
    """A client mistake, answered with `status` (4xx) and a JSON message naming `field`."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field} if self.field else {"error": self.message}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass(frozen=True)
class ImageRequest:
    """One parsed request: the encoded image bytes, a validated custom label set (None: the bundle's), top_k,
    and for /explain whether to add the spatial maps, their per-head split and the total-effect map."""

    image: bytes
    labels: list[str] | None
    top_k: int | None
    spatial: bool = True
    heads: bool = False
    total_effect: bool = False
    edits: tuple[EditSet, ...] = ()  # /intervene: the edit sets (pydantic-checked; ranges are the bundle's to check)
    check_linearity: bool = False  # /intervene: also ablate each top feature alone


class _Fields(BaseModel):
    """The non-image fields, validated the same way for both encodings (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    labels: Optional[list[str]] = Field(default=None, max_length=MAX_LABELS * 4)
    top_k: Optional[int] = Field(default=None, ge=1, le=MAX_TOP_K)
    spatial: bool = True
    heads: bool = False
    total_effect: bool = False
    edits: Optional[list[EditSet]] = Field(default=None, min_length=1, max_length=MAX_EDIT_SETS)
    check_linearity: bool = False


def _where(loc: tuple) -> str:
    """A pydantic error location as a field path: ('edits', 1, 'features', 0, 'layer') -> edits[1].features[0].layer
    (the tags of union members, e.g. 'int', are left out)."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in ("int", "tuple[int,int]"):
            out += f".{p}" if out else str(p)
    return out


def parse_image_request(body: bytes, content_type: str, path: str = "/explain") -> ImageRequest:
    """Parse and validate a request body (see the module docstring) for the endpoint at `path`; raises
    `RequestError` (400)."""
    ctype = content_type.lower()
    if ctype.startswith("multipart/"):
        image, fields = _parse_multipart(body, content_type)
    else:  # BentoML treats every other body as JSON, so do we
        image, fields = _parse_json(body)
    if image is None:
        raise RequestError(400, f"no image: {IMAGE_HINT}", "image")
    try:
        checked = _Fields.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = _where(err["loc"]) or None
        raise RequestError(400, f"{field}: {err['msg']}" if field else err["msg"], field) from None
    if path == "/intervene" and checked.edits is None:
        raise RequestError(400, "edits: missing: send a JSON list of edit sets (docs/intervene.md)", "edits")
    labels = None
    if checked.labels is not None:
        try:
            labels = validate_labels(checked.labels)
        except LabelError as exc:
            raise RequestError(400, str(exc), "labels") from None
    return ImageRequest(image=image, labels=labels, top_k=checked.top_k, spatial=checked.spatial, heads=checked.heads,
                        total_effect=checked.total_effect, edits=tuple(checked.edits or ()),
                        check_linearity=checked.check_linearity)


def check_json_body(body: bytes) -> None:
    """Refuse a body that is not a JSON object (malformed, too deeply nested) before BentoML parses it."""
    if body.strip():
        _json_object(body)


# ---------------------------------------------------------------------- JSON
def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = pydantic_core.from_json(body)
    except ValueError as exc:  # includes "recursion limit exceeded" for deep nesting
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, f"the request body must be a JSON object, got a JSON {type(parsed).__name__}")
    return parsed


def _parse_json(body: bytes) -> tuple[bytes | None, dict[str, Any]]:
    obj = _json_object(body) if body.strip() else {}
    value = obj.pop("image", None)
    if value is None:
        return None, obj
    if not isinstance(value, str):
        raise RequestError(400, f"image must be a base64 string in JSON, got a JSON {type(value).__name__}", "image")
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(400, "image: a data: URL must be base64 ('data:image/png;base64,...')", "image")
    try:
        return base64.b64decode("".join(text.split()), validate=True), obj
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"image is not valid base64 ({exc})", "image") from None


# ---------------------------------------------------------------------- multipart
@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray | None = None


def _parse_multipart(body: bytes, content_type: str) -> tuple[bytes | None, dict[str, Any]]:
    """One pass of python-multipart over the in-memory body; parts stay bytes."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "malformed multipart body: the Content-Type has no boundary")
    parts: list[_Part] = []
    ended: list[bool] = []
    header_field, header_value = bytearray(), bytearray()
    headers: list[tuple[bytes, bytes]] = []

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise RequestError(400, f"malformed multipart body: more than {MAX_PARTS} parts")
        parts.append(_Part(data=bytearray()))
        headers.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]  # type: ignore[operator]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers.append((bytes(header_field).lower(), bytes(header_value)))
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        for key, value in headers:
            if key == b"content-disposition":
                _, opts = parse_options_header(value)
                parts[-1].name = opts.get(b"name", b"").decode("utf-8", "replace")
                fname = opts.get(b"filename")
                parts[-1].filename = None if fname is None else fname.decode("utf-8", "replace")

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_end": lambda: ended.append(True), "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
    })
    try:
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as exc:  # python-multipart's MultipartParseError and friends
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    if not ended:
        raise RequestError(400, "malformed multipart body: it ends before the closing boundary")
    images = [p for p in parts if p.name == "image"]
    if len(images) > 1:
        raise RequestError(400, "send exactly one 'image' part per request", "image")
    if images and images[0].filename is None:
        raise RequestError(400, "'image' must be a file part (e.g. curl -F image=@photo.jpg); URLs and text fields "
                                "are not accepted", "image")
    fields: dict[str, Any] = {}
    for part in parts:
        if part.name not in ("labels", "top_k", "spatial", "heads", "total_effect", "edits", "check_linearity"):
            continue
        if part.filename is not None:
            raise RequestError(400, f"'{part.name}' must be a text field, not a file", part.name)
        text = bytes(part.data or b"").decode("utf-8", "replace")
        if part.name == "labels":
            fields[part.name] = _labels_from_text(text)
        elif part.name == "edits":
            fields[part.name] = _json_field(text, "edits")
        else:
            fields[part.name] = text.strip()
    return (bytes(images[0].data or b"") if images else None), fields


def _json_field(text: str, name: str) -> Any:
    """A multipart text part holding JSON (pydantic-core's parser: its nesting limit refuses deep documents)."""
    try:
        return pydantic_core.from_json(text.strip() or "null")
    except ValueError as exc:
        raise RequestError(400, f"{name} is not valid JSON: {exc}", name) from None


def _labels_from_text(text: str) -> Any:
    """Multipart sends text: a JSON list, or a comma-separated string."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return pydantic_core.from_json(stripped)
        except ValueError:
            raise RequestError(400, "labels is not a valid JSON list", "labels") from None
    return stripped.split(",")


LABELS_DOC = (f"custom label set (1..{MAX_LABELS} distinct labels of 1..{MAX_LABEL_CHARS} characters; in multipart "
              "a JSON list or a comma-separated string); default: the bundle's labels")
TOP_K_DOC = f"number of labels reported, 1..{MAX_TOP_K} and at most the number of labels (default min(5, number of labels))"
IMAGE_DOC = "the image: a multipart file part, or in JSON a base64 string (data: URL prefix allowed)"
SPATIAL_DOC = "where in the image: patch maps per top label (up to the bundle's spatial top-k), per attention layer and summed"
HEADS_DOC = "also per-head patch maps of the predicted label (needs a bundle with spatial maps)"
TOTAL_EFFECT_DOC = ("also the total-effect map of the top labels: the model run on patches + 1 edited copies of the image "
                    "in one batch (each patch alone on the bundle's fill), in logit units; costs patches + 1 forward passes")
EDITS_DOC = (f"/intervene: a JSON list of 1..{MAX_EDIT_SETS} edit sets (features, terms, term_tokens, delete_patches, drop_keys; "
             "docs/intervene.md); in multipart a text part holding the JSON")
LINEARITY_DOC = "/intervene: also ablate each top feature of the unedited run alone (its logit change next to its direct contribution)"


# ---------------------------------------------------------------------- BentoML input specs
STATE_KEY = "cltvit.request"  # scope["state"][STATE_KEY]: the ImageRequest parsed by the guard


def intervene_input_spec() -> type[bentoml.IODescriptor]:
    """BentoML input spec of /intervene (as `image_input_spec`: the guard parsed the body already)."""

    class Input(bentoml.IODescriptor):
        image: Path = Field(description=IMAGE_DOC)
        edits: list[EditSet] = Field(description=EDITS_DOC, min_length=1, max_length=MAX_EDIT_SETS)
        labels: Optional[list[str]] = Field(default=None, description=LABELS_DOC)
        top_k: Optional[int] = Field(default=None, ge=1, le=MAX_TOP_K, description=TOP_K_DOC)
        check_linearity: bool = Field(default=False, description=LINEARITY_DOC)

        @classmethod
        async def from_http_request(cls, request: Request, serde: Any) -> "Input":
            parsed = request.scope.get("state", {}).get(STATE_KEY)
            if not isinstance(parsed, ImageRequest):  # only if the guard is not installed
                raise RuntimeError("image request reached the endpoint without passing the RequestGuard")
            return cls.model_construct(image=parsed.image, edits=list(parsed.edits), labels=parsed.labels, top_k=parsed.top_k,
                                       check_linearity=parsed.check_linearity)  # validated by parse_image_request

    return Input


def image_input_spec(*, with_top_k: bool, with_spatial: bool = False) -> type[bentoml.IODescriptor]:
    """BentoML input spec of an image endpoint: documents the fields (OpenAPI, BentoML's client) and
    hands the endpoint the `ImageRequest` the guard already parsed instead of parsing the body again."""

    class Input(bentoml.IODescriptor):
        image: Path = Field(description=IMAGE_DOC)
        labels: Optional[list[str]] = Field(default=None, description=LABELS_DOC)
        if with_top_k:
            top_k: Optional[int] = Field(default=None, ge=1, le=MAX_TOP_K, description=TOP_K_DOC)
        if with_spatial:
            spatial: bool = Field(default=True, description=SPATIAL_DOC)
            heads: bool = Field(default=False, description=HEADS_DOC)
            total_effect: bool = Field(default=False, description=TOTAL_EFFECT_DOC)

        @classmethod
        async def from_http_request(cls, request: Request, serde: Any) -> "Input":
            parsed = request.scope.get("state", {}).get(STATE_KEY)
            if not isinstance(parsed, ImageRequest):  # only if the guard is not installed
                raise RuntimeError("image request reached the endpoint without passing the RequestGuard")
            fields = {"image": parsed.image, "labels": parsed.labels}
            if with_top_k:
                fields["top_k"] = parsed.top_k
            if with_spatial:
                fields.update(spatial=parsed.spatial, heads=parsed.heads, total_effect=parsed.total_effect)
            return cls.model_construct(**fields)  # validated by parse_image_request

    return Input
