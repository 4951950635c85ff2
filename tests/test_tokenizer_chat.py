"""Chat format: token-for-token equality with llama_models' ChatFormat (encode_dialog_prompt and encode_message)."""
import io

import pytest

from llama32_nb.tokenizer import (Tokenizer, ChatFormat, Message, ToolCall, IMAGE, ImageRef, vision_mask,
                                  render_tool_call)


def png_bytes() -> bytes:
    from PIL import Image
    buf = io.BytesIO(); Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def to_meta(m: dict):
    "Translate one of our dict messages to Meta's RawMessage."
    from llama_models.datatypes import (RawMessage, RawTextItem, RawMediaItem, ToolCall as MToolCall, BuiltinTool,
                                        StopReason)
    def content(c):
        if isinstance(c, list):
            return [RawMediaItem(data=png_bytes()) if (x is IMAGE or isinstance(x, ImageRef)) else RawTextItem(text=x)
                    for x in c]
        return c
    calls = [MToolCall(call_id=f"c{k}",
                       tool_name=BuiltinTool(c["tool_name"]) if c["tool_name"] in BuiltinTool._value2member_map_
                       else c["tool_name"], arguments=c["arguments"]) for k, c in enumerate(m.get("tool_calls", []))]
    stop = StopReason(m["stop_reason"]) if m.get("stop_reason") else None
    return RawMessage(role=m["role"], content=content(m.get("content", "")), tool_calls=calls, stop_reason=stop,
                      context=content(m.get("context")))


SYSTEM = {"role": "system", "content": "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                                      "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n"
                                      "You are a helpful assistant"}
CUSTOM_SYSTEM = {"role": "system",
                 "content": 'You have access to: [{"name": "get_weather", "parameters": {"city": "str"}}]'}

DIALOGS = {
    "simple": [{"role": "system", "content": "You are a helpful assistant"},
               {"role": "user", "content": "Who are you?"}],
    "user_only": [{"role": "user", "content": "Hello <|eot_id|> world <|start_header_id|>"}],
    "empty": [],
    "multi_turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\n\n  With spaces.  "}],
    "builtin_search_eom": [SYSTEM, {"role": "user", "content": "Weather in Menlo Park?"},
                           {"role": "assistant", "content": "", "stop_reason": "end_of_message",
                            "tool_calls": [{"tool_name": "brave_search",
                                            "arguments": {"query": "Menlo Park weather"}}]},
                           {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
                           {"role": "assistant", "content": "It is 21°C and clear.", "stop_reason": "end_of_turn"},
                           {"role": "user", "content": "Thanks"}],
    "wolfram_photogen": [SYSTEM, {"role": "user", "content": "Solve x^2=4"},
                         {"role": "assistant", "content": "", "stop_reason": "end_of_message",
                          "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "solve x^2=4"}},
                                         {"tool_name": "photogen", "arguments": {"query": "a llama"}}]},
                         {"role": "tool", "content": "x = ±2"}],
    "code_interpreter": [SYSTEM, {"role": "user", "content": "Plot sin(x)"},
                         {"role": "assistant", "content": "", "stop_reason": "end_of_message",
                          "tool_calls": [{"tool_name": "code_interpreter",
                                          "arguments": {"code": "import numpy as np\nprint(np.sin(1.0))"}}]},
                         {"role": "tool", "content": "0.8414709848078965"}],
    "custom_tool": [CUSTOM_SYSTEM, {"role": "user", "content": "Weather in Paris and Rome?"},
                    {"role": "assistant", "content": "", "stop_reason": "end_of_turn",
                     "tool_calls": [{"tool_name": "get_weather", "arguments": {"city": "Paris"}},
                                    {"tool_name": "get_weather",
                                     "arguments": {"city": "Rome", "days": 3, "metric": True, "tags": ["a", 1],
                                                   "opts": {"x": None}}}]},
                    {"role": "tool", "content": "[{\"city\": \"Paris\", \"t\": 18}]"}],
    "content_and_tool": [{"role": "user", "content": "Search"},
                         {"role": "assistant", "content": "Let me look.", "stop_reason": "end_of_message",
                          "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "llamas"}}]}],
    "rag_context": [{"role": "user", "content": "What does the doc say?", "context": "The doc says: llamas hum."}],
    "image": [{"role": "user", "content": [IMAGE, "Describe this image in two sentences."]}],
    "image_middle_two": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": ["Compare ", IMAGE, IMAGE, " and tell me.", " Second part"]},
                         {"role": "assistant", "content": "They differ."},
                         {"role": "user", "content": ["Why?", IMAGE]}],
    "list_text": [{"role": "user", "content": ["Hello", " world", "\n\n", "again"]}],
    "unicode": [{"role": "user", "content": "Grüße 😀 नमस्ते สวัสดี 東京"}],
}


@pytest.fixture(scope="module")
def both():
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return ChatFormat(Tokenizer.llama3()), MetaChatFormat(MetaTokenizer.get_instance())


@pytest.mark.parametrize("name", list(DIALOGS))
@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
def test_dialog_prompt_matches_meta(both, name, fmt):
    from llama_models.datatypes import ToolPromptFormat
    ours, meta = both
    dialog = DIALOGS[name]
    got = ours.encode_dialog_prompt(dialog, tool_prompt_format=fmt)
    ref = meta.encode_dialog_prompt([to_meta(m) for m in dialog], tool_prompt_format=ToolPromptFormat(fmt))
    assert got == ref.tokens
    for m in dialog:
        assert ours.encode_message(m, fmt) == meta.encode_message(to_meta(m), ToolPromptFormat(fmt))[0]
    if ref.vision is not None:
        assert vision_mask(got, 128256) == ref.vision.mask
    assert max(ours.encode_dialog_prompt(dialog, image_model_id=False)) < 128256


def test_reference_vector(both):
    ours, _ = both
    assert ours.encode_dialog_prompt(DIALOGS["simple"]) == [
        128000, 128006, 9125, 128007, 271, 2675, 527, 264, 11190, 18328, 128009, 128006, 882, 128007, 271,
        15546, 527, 499, 30, 128009, 128006, 78191, 128007, 271]


def test_message_objects_and_ipython_role(both):
    ours, _ = both
    a = ours.encode_message(Message("assistant", "", [ToolCall("brave_search", {"query": "q"})], "end_of_message"))
    b = ours.encode_message({"role": "assistant", "content": "", "stop_reason": "end_of_message",
                             "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "q"}}]})
    assert a == b and a[-1] == 128008
    assert (ours.encode_message({"role": "ipython", "content": "1"})
            == ours.encode_message({"role": "tool", "content": "1"}))
    assert ours.encode_message({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}) == \
        ours.encode_message({"role": "user", "content": [IMAGE, "x"]})


def test_vision_mask_matches_meta():
    from llama_models.llama3.chat_format import create_vision_mask
    for toks in [[1, 9, 2, 3], [9, 9, 1, 9, 2], [1, 2], [9], [1, 9, 2, 9, 9, 3, 4, 9]]:
        assert vision_mask(toks, 9) == create_vision_mask(toks, 9)


def test_chat_errors(both):
    ours, _ = both
    with pytest.raises(ValueError, match="role"):
        ours.encode_message({"role": "robot", "content": "x"})
    with pytest.raises(ValueError, match="role"):
        ours.encode_message({"content": "x"})
    with pytest.raises(TypeError):
        ours.encode_message({"role": "user", "content": [3]})
    with pytest.raises(ValueError, match="tool_prompt_format"):
        render_tool_call(ToolCall("f", {"a": 1}), "yaml")
    with pytest.raises(ValueError, match="lacks chat special tokens"):
        ChatFormat(Tokenizer.train("hello world " * 50, 300, special_tokens=()))
