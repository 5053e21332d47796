"""Chat template, loss masks, SFT packing and preference pairs — the data side of alignment.

The front door: every stage imports `from flaxlm.data import formats as F`, and this module
re-exports the names of the four modules that hold the code (each imports only the ones
listed before it):

  * data/chat_records.py — records: field names (`fields_config`), the checks of chat,
    prompt-completion, preference and unpaired-feedback rows (`FormatError`, `sft_messages`,
    `preference_parts`, `unpaired_parts`, ...), the `DataReport` and `read_records`.
  * data/chat_template.py — the chat template (`ChatTemplate`, `JinjaChatTemplate`,
    `training_template`) and rendering a conversation into (ids, loss_mask) (`render_chat`,
    `generation_prompt`). Its docstring describes the template, the loss mask, Jinja templates
    and tool use.
  * data/chat_examples.py — records to examples fitted to the row length by the overlength
    policy (`render_sft`, `render_preferences`, `render_unpaired`, `render_prompt`,
    `fit_length`).
  * data/chat_batches.py — the batch iterators (`SFTBatches` packed first-fit,
    `PreferenceBatches`, `UnpairedBatches` with KTO's mismatched rows, `kl_partners`).

Stepwise-labelled solutions (a process reward model's data: records, label positions, batches)
are data/stepwise.py's, built on these modules and not re-exported here.

The private helpers are re-exported too (tests use `_EpochOrder` and `_GlobalOrder`). A
monkeypatch of `F.<name>` reaches callers that look the name up through this module (the
alignment stages do); code inside the four modules calls its neighbours directly, so patch a
name in the module that holds its caller to change what that module calls.
"""

from __future__ import annotations

from flaxlm.data.chat_batches import (
    PreferenceBatches,
    SFTBatches,
    UnpairedBatches,
    _Batches,
    _EpochOrder,
    _GlobalOrder,
    empty_rows,
    kl_partners,
    mismatched,
    place,
)
from flaxlm.data.chat_examples import (
    OVERLENGTH,
    _assistant_runs,
    _check_args,
    _final_len,
    _fitted,
    _sft_pieces,
    fit_length,
    render_preferences,
    render_prompt,
    render_sft,
    render_unpaired,
)
from flaxlm.data.chat_records import (
    MESSAGE_EXTRAS,
    ROLES,
    TOOL_ROLE,
    DataReport,
    FormatError,
    _get,
    _messages,
    fields_config,
    has,
    preference_parts,
    prompt_messages,
    prompt_record,
    read_records,
    record_meta,
    record_tools,
    sft_messages,
    unpaired_parts,
)
from flaxlm.data.chat_template import (
    ChatTemplate,
    JinjaChatTemplate,
    PrefixUnstable,
    TemplateError,
    _needs_jinja,
    _render_jinja,
    generation_prompt,
    naming_record,
    render_chat,
    split_reasoning,
    training_template,
)

__all__ = [
    # chat_records
    "MESSAGE_EXTRAS",
    "ROLES",
    "TOOL_ROLE",
    "DataReport",
    "FormatError",
    "_get",
    "_messages",
    "fields_config",
    "has",
    "preference_parts",
    "prompt_messages",
    "prompt_record",
    "read_records",
    "record_meta",
    "record_tools",
    "sft_messages",
    "unpaired_parts",
    # chat_template
    "ChatTemplate",
    "JinjaChatTemplate",
    "PrefixUnstable",
    "TemplateError",
    "_needs_jinja",
    "_render_jinja",
    "generation_prompt",
    "naming_record",
    "render_chat",
    "split_reasoning",
    "training_template",
    # chat_examples
    "OVERLENGTH",
    "_assistant_runs",
    "_check_args",
    "_final_len",
    "_fitted",
    "_sft_pieces",
    "fit_length",
    "render_preferences",
    "render_prompt",
    "render_sft",
    "render_unpaired",
    # chat_batches
    "PreferenceBatches",
    "SFTBatches",
    "UnpairedBatches",
    "_Batches",
    "_EpochOrder",
    "_GlobalOrder",
    "empty_rows",
    "kl_partners",
    "mismatched",
    "place",
]
