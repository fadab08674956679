"""Python client of the cltvit service, on `bentoml.SyncHTTPClient`.

    from serving.client import CltvitClient
    with CltvitClient("http://127.0.0.1:3000") as client:
        print(client.classify("shoe.png").predicted)
        ex = client.explain("shoe.png", labels=["sneaker", "boot", "sandal"], top_k=2)
        print(ex.explanations[0].terms)

Images may be a path, raw bytes or a PIL image (sent as a multipart upload). Results are the
pydantic models of `serving.schemas`. A 4xx answer raises `ServiceError` with the server's message.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import bentoml
import httpx
from bentoml.exceptions import BentoMLException
from PIL import Image

from .schemas import ClassifyResponse, EditSet, EmbedResponse, ExplainResponse, InfoResponse, InterveneResponse

ImageLike = str | Path | bytes | Image.Image


class ServiceError(RuntimeError):
    """The server refused a request (HTTP status `status`); the message is the server's."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class CltvitClient:
    """Typed helper over `bentoml.SyncHTTPClient` for /classify, /explain, /embed, /intervene and /info."""

    def __init__(self, url: str = "http://127.0.0.1:3000", *, token: str | None = None, timeout: float = 120.0,
                 server_ready_timeout: float | None = 30.0) -> None:
        try:
            self._client = bentoml.SyncHTTPClient(url, token=token, timeout=timeout, server_ready_timeout=server_ready_timeout)
        except BentoMLException as exc:  # it reads /schema.json first; say why that failed
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                status = httpx.get(f"{url.rstrip('/')}/schema.json", headers=headers, timeout=10).status_code
            except httpx.HTTPError:
                status = None
            hint = " (wrong or missing token)" if status == 401 else ""
            raise ServiceError(status, f"cannot use the service at {url}: {exc}{hint}") from None
        self._tmp = tempfile.TemporaryDirectory(prefix="cltvit-client-")
        self._url, self._timeout = url.rstrip("/"), timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def close(self) -> None:
        self._client.close()
        self._tmp.cleanup()

    def __enter__(self) -> "CltvitClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _as_path(self, image: ImageLike) -> Path:
        """Uploads go as files: write bytes / PIL images to a temporary PNG/bytes file first."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} does not exist")
            return path
        tmp = Path(tempfile.mkstemp(dir=self._tmp.name, suffix=".img")[1])
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            tmp.write_bytes(buf.getvalue())
        elif isinstance(image, (bytes, bytearray)):
            tmp.write_bytes(bytes(image))
        else:
            raise TypeError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")
        return tmp

    def _call(self, endpoint: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, endpoint)(**{k: v for k, v in kwargs.items() if v is not None})
        except BentoMLException as exc:
            status = getattr(getattr(exc, "error_code", None), "value", None)
            message = str(exc)
            try:  # the server answers {"error": "...", "field": "..."}
                body = json.loads(message)
                message = body.get("error", message) if isinstance(body, dict) else message
            except json.JSONDecodeError:
                pass
            raise ServiceError(status, message) from None

    def classify(self, image: ImageLike, labels: Sequence[str] | None = None, top_k: int | None = None) -> ClassifyResponse:
        out = self._call("classify", image=self._as_path(image), labels=list(labels) if labels else labels, top_k=top_k)
        return ClassifyResponse.model_validate(out)

    def explain(self, image: ImageLike, labels: Sequence[str] | None = None, top_k: int | None = None, *,
                spatial: bool = True, heads: bool = False) -> ExplainResponse:
        """`spatial`: where in the image per top label (`ExplainResponse.spatial`); `heads`: per-head maps too."""
        out = self._call("explain", image=self._as_path(image), labels=list(labels) if labels else labels, top_k=top_k,
                         spatial=spatial, heads=heads)
        return ExplainResponse.model_validate(out)

    def embed(self, image: ImageLike, labels: Sequence[str] | None = None) -> EmbedResponse:
        out = self._call("embed", image=self._as_path(image), labels=list(labels) if labels else labels)
        return EmbedResponse.model_validate(out)

    def intervene(self, image: ImageLike, edits: Sequence[EditSet | dict[str, Any]], labels: Sequence[str] | None = None,
                  top_k: int | None = None, *, check_linearity: bool = False) -> InterveneResponse:
        """What if: the image unedited and once per edit set (docs/intervene.md)."""
        sets = [e if isinstance(e, EditSet) else EditSet.model_validate(e) for e in edits]
        data = {"edits": json.dumps([s.model_dump(mode="json") for s in sets]), "check_linearity": str(check_linearity).lower()}
        if labels:
            data["labels"] = json.dumps(list(labels))
        if top_k is not None:
            data["top_k"] = str(top_k)
        # posted here, not through bentoml's client: its response decoder fails on the result's null fields
        path = self._as_path(image)
        r = httpx.post(f"{self._url}/intervene", files={"image": (path.name, path.read_bytes())}, data=data,
                       headers=self._headers, timeout=self._timeout)
        if r.status_code != 200:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise ServiceError(r.status_code, message)
        return InterveneResponse.model_validate(r.json())

    def info(self) -> InfoResponse:
        return InfoResponse.model_validate(self._call("info"))
