"""Child process for export's llama.cpp check: a crash in llama.cpp's C code must not take the export with it.

Reads {"gguf", "texts", "prompt_ids", "stop_ids", "max_new_tokens", "n_ctx", "logits_files"} as JSON on stdin,
writes {"version", "add_bos", "tokens": [...], "eog": {...}, "greedy": [...]} as JSON on stdout, and for each
prompt i llama.cpp's logits to logits_files[i] (float32 .npy, one row per evaluated position: row j holds the
logits after token j of prompt + continuation, so the last prompt row predicts the first generated token).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import llama_cpp
    import numpy as np

    job = json.load(sys.stdin)
    # logits_all: every position's logits are kept (not only the last), for the logit error on the prompt
    llm = llama_cpp.Llama(job["gguf"], n_ctx=job["n_ctx"], n_threads=1, verbose=False, seed=0, logits_all=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = set(job["stop_ids"])
    out = {"version": llama_cpp.__version__, "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
           "tokens": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]],
           "eog": {str(i): bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in job["stop_ids"]}, "greedy": []}
    for ids, logits_file in zip(job["prompt_ids"], job["logits_files"]):
        llm.reset()  # each prompt from an empty cache: no prefix reused from the previous prompt
        got = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(tok))
            if tok in stops or len(got) >= job["max_new_tokens"]:
                break
        out["greedy"].append(got)
        np.save(logits_file, np.asarray(llm.scores[:llm.n_tokens], dtype=np.float32))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
