"""OpenAI's wire format: the request fields onnxpipe reads, the objects it answers with, the error body.

Field names, types and defaults follow the `openai` package's types (ChatCompletion, ChatCompletionChunk,
Completion, CreateEmbeddingResponse, Model) so that any OpenAI client parses the answers. A request field
of the wrong type is a 400 naming the field (`param`), as OpenAI answers it.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np


class APIError(Exception):
    """An answer other than 200, with OpenAI's error body {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")


# --- request fields ----------------------------------------------------------------------------


def field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    """BODY[NAME] when it is one of KINDS (bool is never a number), DEFAULT when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # true is not 1 here
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise APIError(400, f"'{name}' must be {names}", param=name)
    return value


_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = field(body, name, float)
    if value is not None and not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low:g} and {high:g}, not {value:g}", param=name)
    return value


def integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = field(body, name, int)
    if value is not None and (value < low or (high is not None and value > high)):
        upper = f" and at most {high}" if high is not None else ""
        raise APIError(400, f"'{name}' must be at least {low}{upper}, not {value}", param=name)
    return value


def texts(body: dict[str, Any], name: str = "input", allow_empty: bool = True) -> tuple[list[str], bool]:
    """BODY[NAME] as a list of strings, and whether it came as one string (not a list)."""
    value = body.get(name)
    if isinstance(value, str):
        items, single = [value], True
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items, single = value, False
    elif isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise APIError(400, f"'{name}' as token ids is not supported here: send text", param=name)
    elif value is None:
        raise APIError(400, f"'{name}' is required", param=name)
    else:
        raise APIError(400, f"'{name}' must be a string or a non-empty array of strings", param=name)
    if not allow_empty and any(not t for t in items):
        raise APIError(400, f"'{name}' cannot contain an empty string", param=name)
    return items, single


def task_inputs(body: dict[str, Any]) -> list[Any]:
    """onnxpipe's task endpoints: "input" as a text, a {"question", "context"} object (answer), or a
    non-empty list of texts, [text, text_pair] pairs and such objects; as the Python API takes them."""
    value = body.get("input")
    if value == []:
        raise APIError(400, "'input' cannot be an empty array", param="input")
    items: list[Any] = value if isinstance(value, list) else [value]  # a pair alone is [[text, text_pair]]
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and _pair(item):
            out.append((item[0], item[1]))
        elif (
            isinstance(item, dict)
            and set(item) == {"question", "context"}
            and all(isinstance(v, str) for v in item.values())
        ):
            out.append(dict(item))
        else:
            raise APIError(
                400,
                '\'input\' must be a text, a {"question", "context"} object, or a non-empty array of texts, '
                "[text, text_pair] pairs and such objects",
                param="input",
            )
    return out


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def stop_strings(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return [s for s in value if s]
    raise APIError(400, "'stop' must be a string or an array of at most 4 strings", param="stop")


def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages as {"role", "content"} with text content (content parts of type text are joined)."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"'{where}' must be an object with a 'role'", param=where)
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'{where}.content': only text parts are supported", param=where)
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string or an array of text parts", param=where)
        role = "system" if message["role"] == "developer" else str(message["role"])
        out.append({"role": role, "content": content})
    return out


# --- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str:
    """onnxpipe's eos/stop/length as OpenAI's stop/length."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_object(name: str, created: int, task: str) -> dict[str, Any]:
    # "owned_by" is OpenAI's; the task tells a client which endpoint an export answers.
    return {"id": name, "object": "model", "created": created, "owned_by": "onnxpipe", "task": task}


def embedding_data(vector: np.ndarray, index: int, encoding_format: str) -> dict[str, Any]:
    """One embedding: a list of floats, or little-endian float32 bytes in base64 (what OpenAI sends)."""
    if encoding_format == "base64":
        value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    else:
        value = np.asarray(vector, dtype=np.float32).tolist()
    return {"object": "embedding", "index": index, "embedding": value}
