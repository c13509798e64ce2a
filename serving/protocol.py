"""OpenAI-compatible request and response shapes, validated with clear messages."""

from __future__ import annotations

import json
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from onlinespec.decode.grammar import JSON_OBJECT, Structure

__all__ = ["CompletionRequest", "ChatMessage", "ChatRequest", "StreamOptions", "error_body", "new_id", "MAX_SEED"]

MAX_SEED = 2**63 - 1  # seeds are int64, as in vLLM: torch's generator refuses 2**64 and beyond
_INT32 = 2**31 - 1  # a bound for counts whose real limit the server checks with its own message
MAX_STRUCTURE_CHARS = 65536  # a schema (as compact JSON), regex or choice list: its masks cost the batch's step
MAX_PROMPTS = 128  # prompts in one batched completions request (the queue bounds prompts x n too)


# OpenAI request fields this server does not apply, each with the values that ask for nothing (what
# clients send by default): any other value is refused with a 400 that names it, never ignored
# (a field silently dropped would give a response the client did not ask for)
UNSUPPORTED = {
    "best_of": (1,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
    "audio": (None,), "modalities": (["text"],), "web_search_options": (None,),
    # vLLM's, each of which would change the text or the response
    "use_beam_search": (False,), "length_penalty": (1,), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "bad_words": ([],),
    "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,), "return_tokens_as_token_ids": (False,),
    "logits_processors": (None,), "guided_grammar": (None,), "structural_tag": (None,), "chat_template": (None,),
    "documents": (None,), "priority": (0,),
}


def _neutral(value, neutral: tuple) -> bool:
    """Whether ``value`` is one of ``neutral`` (a number by value, 0.0 as 0; a bool only as a bool)."""
    for v in neutral:
        if isinstance(v, bool) or isinstance(value, bool):
            if value is v:
                return True
        elif value == v:
            return True
    return False


def _refuse_unsupported(data, served: frozenset = frozenset()):
    """The first field of ``UNSUPPORTED`` (but those ``served``) that asks for something: a clear error."""
    if isinstance(data, dict):
        for name, neutral in UNSUPPORTED.items():
            value = data.get(name) if name not in served else None
            if value is not None and not _neutral(value, neutral):
                raise ValueError(f"{name} is not supported by this server: send {json.dumps(neutral[0])} "
                                 "or leave it out")
    return data


def _check_text(value: str, name: str) -> str:
    """A string that can be encoded: JSON allows lone surrogates (\\ud800), UTF-8 does not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text (lone surrogate at index {exc.start})") from None
    return value


def _content_text(v: str | list[dict], name: str, sep: str = "\n") -> str:
    """A ``content``: text, or OpenAI's list of content parts, whose text parts are joined with
    ``sep`` (a message's with newlines, as vLLM joins them for a text-only model); other parts
    (images, audio, files) are refused, since the models served read text only."""
    if isinstance(v, list):
        texts = []
        for part in v:
            kind = part.get("type")
            if kind not in ("text", "input_text"):
                raise ValueError(f"content parts of type {str(kind)[:32]!r} are not supported: this server's "
                                 "model reads text only (parts of type text)")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError("a text content part needs text: a string")
            texts.append(text)
        v = sep.join(texts)
    return _check_text(v, name)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema the text follows (``strict`` or not:
    the server always holds the text to it)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (anything), ``json_object`` (any JSON object) or
    ``json_schema`` (a JSON value that follows ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema: {name, schema}")
        return self

    @property
    def structure(self) -> Structure | None:
        """What the text follows (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Structure("json", JSON_OBJECT)
        return Structure("json", json.dumps(self.json_schema.schema_, separators=(",", ":")))


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: one of ``json`` (a schema), ``json_object``, ``regex`` or
    ``choice``."""

    model_config = ConfigDict(extra="forbid")

    json_: dict | bool | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "json_object", "regex", "choice") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes one of json, json_object, regex or choice")
        return self

    @property
    def structure(self) -> Structure:
        if self.json_ is not None:
            spec = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_, separators=(",", ":"))
            return Structure("json", spec)
        if self.json_object:
            return Structure("json", JSON_OBJECT)
        if self.regex is not None:
            return Structure("regex", self.regex)
        return Structure.choice(self.choice)


class PredictedOutput(BaseModel):
    """OpenAI's ``prediction``: text the answer is expected to hold much of (a file to rewrite, a
    paragraph to fix), drafted from (:mod:`onlinespec.decode.prediction`); the answer is the
    model's whatever it says."""

    type: Literal["content"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        return _content_text(v, "prediction", sep="")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=_INT32)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT32)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=_INT32)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)  # vLLM's
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)  # choices: n requests of the same prompt, queued together
    user: str | None = Field(default=None, max_length=256)  # scopes suffix speculation; the record's tenant
    # OpenAI's request metadata (up to 16 string pairs); "domain" names the request's traffic group:
    # drafter choice and acceptance estimates are kept per group (onlinespec/learn/estimate.py)
    metadata: dict[str, str] | None = None
    # OpenAI's penalties and biases (vLLM's repetition_penalty): applied to the target's logits
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]
    # vLLM's: token ids that end the text as EOS does (counted in usage, left out of the text)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    # vLLM's: the only token ids the text may hold
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1, max_length=1 << 17)
    # vLLM's: no EOS, stop token or stop string ends the text within its first min_tokens tokens
    min_tokens: int = Field(default=0, ge=0, le=_INT32)
    # vLLM's: requests read only what the prefix cache keeps of requests with the same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    # structured output (onlinespec/decode/grammar.py): OpenAI's response_format, or vLLM's
    # structured_outputs (and its older guided_json, guided_regex, guided_choice)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    prediction: PredictedOutput | None = None
    # OnlineSpec extensions
    k: int | None = Field(default=None, ge=1, le=32)
    ignore_eos: bool = False

    SERVED: ClassVar[frozenset] = frozenset()  # fields of UNSUPPORTED this kind of request serves

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return _refuse_unsupported(data, cls.SERVED)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        items = [v] if isinstance(v, str) else v
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop must be up to 4 non-empty strings")
        return [_check_text(s, "stop") for s in items]

    _structure: Structure | None = PrivateAttr(default=None)

    @property
    def structure(self) -> Structure | None:
        """What the text must follow, from whichever field asked for it (one at most)."""
        return self._structure

    @model_validator(mode="after")
    def _one_structure(self):
        """The structure of whichever field asks for one: one at most, of a bounded size."""
        given = [s for s in (
            self.response_format.structure if self.response_format else None,
            self.structured_outputs.structure if self.structured_outputs else None,
            StructuredOutputs(json=self.guided_json).structure if self.guided_json is not None else None,
            Structure("regex", self.guided_regex) if self.guided_regex else None,
            Structure.choice(self.guided_choice) if self.guided_choice is not None else None) if s is not None]
        if len(given) > 1:
            raise ValueError("give one of response_format, structured_outputs, guided_json, guided_regex or "
                             "guided_choice")
        if given and len(given[0].spec) > MAX_STRUCTURE_CHARS:
            raise ValueError(f"the structured output's {given[0].kind} is {len(given[0].spec)} characters, more "
                             f"than {MAX_STRUCTURE_CHARS}: its token masks would cost every request in the batch")
        self._structure = given[0] if given else None
        return self

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, v, info):
        if v and any(t < 0 or t > _INT32 for t in v):
            raise ValueError(f"{info.field_name} are token ids: integers in [0, 2**31)")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v):
        return v if v is None else _check_text(v, "user")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if not v:
            return None
        if len(v) > 300:
            raise ValueError("logit_bias maps at most 300 token ids")
        for key, bias in v.items():
            if not key.isdigit() or int(key) > _INT32:
                raise ValueError(f"logit_bias keys are token ids, got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias}")
        return v

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt(cls, v):
        return v if v is None else _check_text(v, "cache_salt")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        for key, value in v.items():
            if not key or len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are 1-64 characters, values at most 512")
            _check_text(key, "metadata")
            _check_text(value, "metadata")
        domain = v.get("domain")
        if domain is not None and not (0 < len(domain) <= 64 and domain.isprintable()):
            raise ValueError("metadata.domain must be 1-64 printable characters")
        return v

    @property
    def domain(self) -> str | None:
        return (self.metadata or {}).get("domain")


class CompletionRequest(_Sampling):
    SERVED: ClassVar[frozenset] = frozenset({"echo"})

    # one prompt (text or token ids), or several (OpenAI's batched form): each gets ``n`` choices
    prompt: str | list[int] | list[str] | list[list[int]]
    # the chosen token's log-prob and this many alternatives' per token (OpenAI allows 5, vLLM 20)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # the prompt before the completion, in the text and (with logprobs) in the log-probs: the
    # prompt's tokens scored by the target as it reads them, the first one with none
    echo: bool = False

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and v == "") or (isinstance(v, list) and not v):
            raise ValueError("prompt must not be empty")
        several = isinstance(v, list) and not isinstance(v[0], int)
        if several and len(v) > MAX_PROMPTS:
            raise ValueError(f"prompt holds at most {MAX_PROMPTS} prompts")
        for one in v if several else [v]:
            if not one:
                raise ValueError("prompt must not be empty")
            if isinstance(one, str):
                _check_text(one, "prompt")
            elif any(t < 0 or t > _INT32 for t in one):
                raise ValueError("prompt token ids must be integers in [0, 2**31)")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: its one, or each of a batched ``prompt``."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)


class ChatMessage(BaseModel):
    """A message's ``content``: text or text parts (:func:`_content_text`)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        return _content_text(v, "content")


# names a chat template is rendered with, or apply_chat_template's own: not a client's to set
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "raise_exception", "strftime_now"})


class ChatOptions(BaseModel):
    """How the messages go through the model's chat template (vLLM's chat fields): with the
    header that starts the answer (``add_generation_prompt``, the default), or with the text
    ending inside the last message so that the answer goes on with it (``continue_final_message``:
    a client that writes the answer's beginning); ``chat_template_kwargs``: more variables for
    the template (for example a model's ``enable_thinking``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        if not v:
            return None
        if len(v) > 16:
            raise ValueError("chat_template_kwargs holds at most 16 variables")
        for key in v:
            if not key.isidentifier() or len(key) > 64:
                raise ValueError(f"chat_template_kwargs keys are template variable names, got {key[:64]!r}")
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"chat_template_kwargs cannot set {key!r}: the server sets it")
        if len(json.dumps(v)) > 16384:
            raise ValueError("chat_template_kwargs is at most 16 KB as JSON")
        return v

    @model_validator(mode="after")
    def _one_ending(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: the text "
                             "either goes on with the last message or starts a new answer")
        return self

    @property
    def render_options(self) -> dict:
        """:func:`onlinespec.decode.chat.render`'s options."""
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "template_kwargs": self.chat_template_kwargs}


class ChatRequest(ChatOptions, _Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must not be empty")
        return v


class TokenizeRequest(ChatOptions):
    """vLLM's ``/tokenize``: a prompt, or chat messages as the chat route renders them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        if self.prompt is not None:
            _check_text(self.prompt, "prompt")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize``: token ids back to text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v):
        if any(t < 0 or t > _INT32 for t in v):
            raise ValueError("tokens are token ids: integers in [0, 2**31)")
        return v


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
