"""The files users have besides BlinkDL's ``.pth``: Hugging Face model folders (:mod:`.hf`, one key
layout per architecture), state-tuned initial states (:mod:`.tuned_state`), LoRA adapters merged at
load (:mod:`.lora`), and conversion between formats (:mod:`.convert`).

Every reader returns tensors under BlinkDL's key names, so the rest of rwkvkit (validation, the
architecture, backends) sees one layout whatever the file was.
"""
