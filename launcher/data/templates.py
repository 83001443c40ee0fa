"""Named chat templates: the published prompt formats of the common model families, as Jinja that Hugging Face's
`apply_chat_template` renders the same way (the template that trained is written into the exported tokenizer).

Each writes its family's special tokens as text (`<|begin_of_text|>`, `<s>`, `<bos>`), not `bos_token`, so the
rendered text is that family's whatever tokenizer trains; the tokenizer should know them as special tokens (a
tokenizer that does not splits them into pieces, which still trains, but is not the family's ids). A template must
render a conversation as the growing text of its turns (formats.py finds the trained turns that way), so a system
message goes where it stays put as turns are added: first, or into the first user turn for the families with no
system turn (Mistral, Gemma). Pinned by tests/test_chat.py on a fixed conversation.
"""

from __future__ import annotations

# The launcher's own: plain-text role headers; each assistant turn ends with EOS, so a model learns to stop. With
# the byte-level tokenizer, EOS is written <|endoftext|> in the text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# ChatML (OpenAI's, used by Qwen, Hermes, ...): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5-Instruct: ChatML with Qwen's default system message when the conversation has none
QWEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta Llama 3 Instruct: <|begin_of_text|>, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per turn
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral-7B-Instruct v0.1/v0.2: <s>[INST] user [/INST]assistant</s>[INST] ...; a system message opens the first
# user turn, followed by a blank line. The generation prompt adds nothing (the answer follows [/INST]).
MISTRAL = (
    "{{ '<s>' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
    "{% else %}{{ raise_exception('mistral: only user and assistant turns (and a first system message) are supported') }}"
    "{% endif %}{% endfor %}"
)

# Gemma (2 and 3) instruction-tuned: <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...; the
# assistant's role is written `model`; a system message opens the first user turn, followed by a blank line (Gemma 3)
GEMMA = (
    "{{ '<bos>' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "qwen": QWEN, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA, "default": DEFAULT_CHAT_TEMPLATE}

# the family's special tokens each named template writes: a tokenizer should have each as one token
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
}
