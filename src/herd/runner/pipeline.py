"""The request pipeline: a generate, chat or embed request -> what the engine runs, and
the engine's events -> Ollama's answer. The library (`herd.api`) and the runner process
(`herd.runner.serve`) both go through here, so each rule below holds in one place:

    rule                          where
    options                       `Loaded.defaults` (Ollama's < model's) < the request's
    system message                generate: `system`, else the model's (Modelfile SYSTEM);
                                  chat: the model's, unless the first message is one
    model messages                the Modelfile's MESSAGEs before the request's (generate:
                                  not when it continues a `context`)
    template                      the request's text, else the model's; none: plain text
    format turns thinking off     a grammar holds from the first token: nothing to think in
    output parser                 tools and thinking, told apart as the template writes
                                  them; Ollama's "does not support ..." when it cannot
    images                        Ollama's `[img-N]` tags, before the content of the
                                  message that brought them (or where its text has
                                  `[img]`), become the model's image text and placeholders;
                                  a model without vision: "does not support vision"
    tokens                        `context` (an earlier answer's; ids outside the
                                  vocabulary: InvalidTokenError) + the prompt, which gets
                                  BOS/EOS only when it starts the sequence; special tokens
                                  in the text are parsed (a raw prompt is fully templated)
    context length                one check: over it, ContextLengthError with
                                  `truncate: false`, else cut (the runner keeps `num_keep`
                                  and the latest tokens; an embedding keeps its last token)
    output parser by name         the model's PARSER (Modelfile), when herd has it; else
                                  the formats the template writes
    final event                   counters (`prompt_eval_count`: the whole prompt, as
                                  Ollama's; `prompt_cached_count`: its reused part;
                                  `draft_proposed`/`draft_accepted` when it speculated),
                                  and `context` (prompt + answer) when wanted
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from herd.errors import (
    CapabilityError,
    ContextLengthError,
    ImageError,
)
from herd.models import Vision
from herd.models.imageproc import decode, digest
from herd.options import Options
from herd.runner.faults import check_tokens
from herd.runner.images import Image
from herd.runner.loaded import Loaded
from herd.runner.sequence import Event, context_size
from herd.sample.grammar import Grammar
from herd.template import ChatTemplate, select_template
from herd.template.infer import infer_thinking_tags, supports_tools
from herd.template.parsers import NAMED, OutputParser, Parsed


@dataclass
class Request:
    """A generate request (`prompt`, with `system`, `raw` and `context`) or a chat request
    (`messages`), as the library's calls and the runner pipe's messages both give it."""

    prompt: str = ""
    messages: list[dict[str, Any]] | None = None  # a message's "images": [bytes, ...]
    images: list[bytes] = field(default_factory=list)  # generate's
    system: str | None = None  # generate's; None: the model's, "": none
    raw: bool = False  # the prompt is already templated: no template, no system
    context: Sequence[int] = ()  # generate: the tokens this prompt continues
    template: str | None = None  # this request's template text instead of the model's
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema
    options: dict[str, Any] | None = None  # by Ollama's names
    truncate: bool = True  # False: ContextLengthError for a prompt over the context
    want_context: bool = False  # the final event gives prompt + answer tokens (generate)
    parser: str = ""  # the model's PARSER (Modelfile): herd.template.parsers.NAMED


@dataclass
class Prepared:
    """A request ready for the engine."""

    tokens: list[int]  # the whole prompt: context + the rendered text's tokens
    options: Options
    grammar: Grammar | None  # constrains the answer (`format`)
    parser: OutputParser | None  # tools and thinking; None: the answer is all content
    text: str  # the rendered prompt
    want_context: bool = False
    # (index in `tokens` of its first placeholder, image) of each image in the prompt
    images: list[tuple[int, Image]] = field(default_factory=list)

    def parse(self, event: Event) -> Parsed:
        """The event's text as content, thinking and tool calls."""
        if self.parser is None:
            return Parsed(event.text)
        return self.parser.add(event.text, event.done)


def prepare(loaded: Loaded, request: Request) -> Prepared:
    """The tokens, options, grammar and output parser of a generate or chat request (the
    rules in the table above); raises what the model or the context cannot take."""
    if loaded.is_embedding:
        raise CapabilityError(f'"{loaded.name}" does not support generate')
    options = loaded.defaults.merged(request.options)
    # a grammar holds from the first token: a thinking model is told not to think
    think = False if request.format and request.think else request.think
    template = loaded.template
    if request.template:  # this request's own
        template = select_template(loaded.gguf.kv, request.template)
    sent = _images(request)
    if sent and loaded.vision is None:
        raise CapabilityError(f'"{loaded.name}" does not support vision')
    request, images = _tag_images(request, sent, loaded.vision.max_images if sent else 0)
    text = _render(loaded, request, template, think)
    # before tokenizing (hundreds of bytes a character): a template's output far past any
    # context (a request's `printf "%9999999d"`) must not cost gigabytes (the HTTP fuzz run)
    limit = max(256 * 1024, 32 * context_size(options, loaded.context_length))
    if len(text) > limit:
        raise ContextLengthError(
            f"the prompt is {len(text)} characters, far more than the context can hold "
            f"(limit {limit})"
        )
    parser = _parser(loaded.name, template, request.tools, think, text, request.parser)
    context = list(request.context)
    if context:  # an earlier answer's, or forged
        check_tokens(context, loaded.n_vocab, "context")
    tokens, placed = _tokenize(loaded, text, images, add_special=not context)
    placed = [(len(context) + start, image) for start, image in placed]
    tokens = context + tokens
    n_ctx = context_size(options, loaded.context_length)
    check_length(len(tokens), n_ctx - 1, n_ctx, request.truncate)  # a cell for the answer
    grammar = Grammar.from_format(loaded.tokenizer, request.format) if request.format else None
    return Prepared(tokens, options, grammar, parser, text, request.want_context, placed)


_TAG = re.compile(r"\[img-(\d+)\]")


def _images(request: Request) -> list[list[bytes]]:
    """The images of the request, by message (generate: one list)."""
    if request.messages is None:
        return [list(request.images)] if request.images else []
    return [list(m["images"]) for m in request.messages if m.get("images")]


def _tag_images(
    request: Request, sent: list[list[bytes]], most: int
) -> tuple[Request, list[bytes]]:
    """The request with Ollama's `[img-N]` tag for each image in its text, N counting the
    images in order: before the content of the message (or generate prompt) that brought
    it, or in place of an `[img]` the text has; and the images' bytes by N. A model that
    takes at most `most` images (0: any) gets the latest ones of the conversation (an
    image of an earlier turn gives way to a newer one); more in one message is an error."""
    if most and sent and len(sent[-1]) > most:
        raise ImageError(
            f"this model takes at most {most} image{'s' if most > 1 else ''} per message; "
            f"{len(sent[-1])} were sent"
        )
    skip = max(0, sum(map(len, sent)) - most) if most else 0
    images: list[bytes] = []
    seen = 0

    def tagged(content: str, data: Sequence[bytes]) -> str:
        nonlocal seen
        prefix = ""
        for item in data:
            seen += 1
            if seen <= skip:  # an older image the model has no room for
                continue
            tag = f"[img-{len(images)}]"
            images.append(bytes(item))
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        return prefix + content

    if request.messages is None:
        if not request.images:
            return request, images
        prompt = tagged(request.prompt, request.images)
        return replace(request, prompt=prompt), images
    messages = []
    for m in request.messages:
        if m.get("images"):
            m = {**m, "content": tagged(str(m.get("content") or ""), m["images"])}
        messages.append(m)
    return replace(request, messages=messages), images


def _tokenize(
    loaded: Loaded, text: str, images: list[bytes], add_special: bool
) -> tuple[list[int], list[tuple[int, Image]]]:
    """The rendered prompt's tokens, each `[img-N]` tag replaced by image N's text and
    placeholders, and where each image's placeholders start. Text is tokenized in pieces
    split at the placeholders, which the model's image text puts next to special tokens
    (Gemma 3's `<start_of_image>`): the pieces tokenize as the whole text would."""
    if not images:
        return loaded.tokenize(text, add_special=add_special, parse_special=True), []
    vision = loaded.vision
    assert vision is not None
    before, after = vision.image_text
    pieces = _TAG.split(text)  # text, N, text, N, ..., text
    tokens: list[int] = []
    placed: list[tuple[int, Image]] = []
    pending = pieces[0]
    for i in range(1, len(pieces), 2):
        n, rest = int(pieces[i]), pieces[i + 1]
        if n >= len(images):  # no such image: the tag is text
            pending += f"[img-{n}]" + rest
            continue
        tokens += loaded.tokenize(pending + before, add_special and not tokens, True)
        image = _image(loaded, vision, images[n])
        placed.append((len(tokens), image))
        tokens += [vision.image_token] * image.tokens
        pending = after + rest
    tokens += loaded.tokenize(pending, add_special and not tokens, True)
    return tokens, placed


def _image(loaded: Loaded, vision: Vision, data: bytes) -> Image:
    """An image's bytes, decoded (ImageError for what is no image or over the limits)
    and preprocessed for the model; kept by digest, since every chat turn resends them
    (decoding and resizing a photo takes ~0.1 s)."""
    key = digest(data)
    image = loaded.images.get(key)
    if image is None:
        pixels = vision.preprocess(decode(data, loaded.image_limits))
        image = loaded.images.put(key, Image(key, pixels, vision.image_tokens(pixels)))
    return image


def _render(
    loaded: Loaded, request: Request, template: ChatTemplate | None, think: bool | str | None
) -> str:
    source, messages = loaded.source, request.messages
    if messages is None:  # generate: system, the model's MESSAGEs unless continuing, prompt
        if request.raw or template is None:
            return request.prompt
        system = request.system if request.system is not None else source.system
        messages = [{"role": "system", "content": system}] if system else []
        if not request.context:
            messages += source.messages
        messages.append({"role": "user", "content": request.prompt})
    else:  # chat: the model's MESSAGEs, then its SYSTEM unless the request starts with one
        if source.system and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": source.system}, *messages]
        messages = [*source.messages, *messages]
    if template is None:
        return "\n".join(str(m.get("content") or "") for m in messages)
    return template.render(messages, add_generation_prompt=True, tools=request.tools, think=think)


def _parser(
    name: str,
    template: ChatTemplate | None,
    tools: list[dict[str, Any]] | None,
    think: bool | str | None,
    prompt: str,
    parser: str = "",
) -> OutputParser | None:
    """The output parser for tools and thinking (None without either); errors in Ollama's
    words when the template (or the model's named parser) cannot do what is asked."""
    named = NAMED.get(parser)  # Ollama's rule: the parser's support, or the template's
    thinks = (named is not None and named.thinking) or all(infer_thinking_tags(template))
    if think not in (None, False) and not thinks:
        raise CapabilityError(f'"{name}" does not support thinking')
    if tools and not ((named is not None and named.tools) or supports_tools(template)):
        raise CapabilityError(f'"{name}" does not support tools')
    if not tools and think in (None, False):
        return None
    return OutputParser(template, tools=tools, think=think, prompt=prompt, named=named)


def finish(prepared: Prepared, event: Event) -> dict[str, Any]:
    """Ollama's fields of the final answer: why it ended, the counters (durations in ns),
    and `context` (the prompt's tokens and the answer's) when the request wants it.

    `prompt_eval_count` is the whole prompt, its cached part included, as Ollama reports
    it (its runner counts the sequence's inputs before the cache is consulted; at HEAD,
    llama-server's cache_n + prompt_n); `prompt_cached_count` (herd's) is the part reused
    from the cache, which OpenAI calls `cached_tokens`. `prompt_eval_duration` covers only
    the computed part."""
    out: dict[str, Any] = {
        "done_reason": event.done_reason,
        "prompt_eval_count": event.prompt_eval_count + event.prompt_cached_count,
        "prompt_cached_count": event.prompt_cached_count,
        "prompt_eval_duration": event.prompt_eval_duration,
        "eval_count": event.eval_count,
        "eval_duration": event.eval_duration,
    }
    if event.draft_proposed:  # speculative decoding (herd's): proposed, kept
        out["draft_proposed"] = event.draft_proposed
        out["draft_accepted"] = event.draft_accepted
    if prepared.want_context:
        out["context"] = prepared.tokens + list(event.tokens)
    return out


# ---- embeddings ---------------------------------------------------------------------------
def prepare_embed(
    loaded: Loaded, texts: Sequence[str], truncate: bool
) -> tuple[list[list[int]], int]:
    """The token lists of `texts`, each cut to the context keeping its last token (the
    [SEP] an encoder pools or ends on), and how many tokens they had before cutting."""
    if not loaded.is_embedding:
        raise CapabilityError(f'"{loaded.name}" does not support embeddings')
    n_ctx, inputs, count = loaded.context_length, [], 0
    for text in texts:
        ids = loaded.tokenize(text)
        count += len(ids)
        if check_length(len(ids), n_ctx, n_ctx, truncate):
            ids = ids[: n_ctx - 1] + ids[-1:]
        inputs.append(ids)
    return inputs, count


def check_length(n: int, room: int, n_ctx: int, truncate: bool) -> bool:
    """Whether an input of `n` tokens must be cut to fit the `room` it has in a context
    of `n_ctx`; ContextLengthError instead when `truncate` is false."""
    if n <= room:
        return False
    if not truncate:
        raise ContextLengthError(
            f"the input length ({n} tokens) exceeds the context length ({n_ctx} tokens)"
        )
    return True
