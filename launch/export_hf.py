"""Export a model in the LLaMA-O1 format as a Hugging Face checkpoint (o1jax/export.py):

  python -m launch.export_hf --model=smollm2-135m-instruct \\
      --adapter=configs/adapters/smollm2_135m_rating.safetensors --out=runs/export
  python -m launch.export_hf --checkpoint=runs/selfplay_smollm2 --out=runs/export_selfplay --dtype=bfloat16

The LoRA is merged into the base weights, the format's tokens are in the vocabulary and the tokenizer files, and
a README.md model card says what the model is and where it came from; transformers' AutoModelForCausalLM and
AutoTokenizer load the directory. --checkpoint takes the adapter a self-play run (launch.train) wrote into its
workdir, on the base model the run recorded (or --model). A bad flag, an output directory in the way, a missing
or corrupt adapter or workdir, or an adapter made for another model ends the run with one line on stderr and
exit status 2; the output directory is checked before any model is read.
"""

from __future__ import annotations

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags  # noqa: E402

from launch import app  # noqa: E402
from o1jax import export  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Base model: a packaged name (smollm2-135m-instruct) or a path; with "
                             "--checkpoint, the one the run recorded by default.")
_ADAPTER = flags.DEFINE_string("adapter", None, "Adapter file to merge (launch.pretrain); none: the base model with "
                               "the format's tokens at the mean embedding.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Self-play workdir (launch.train) whose adapter.safetensors to "
                                  "merge.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (new or empty).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", export.DTYPES, "Dtype of the exported weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")


def main(argv):
  del argv
  with app.user_errors():
    if not _OUT.value:
      app.fail("--out is required: the directory to write the export to.")
    adapter = _ADAPTER.value or None   # --adapter= (empty) as the config files write "no adapter"
    if _CHECKPOINT.value is not None and adapter is not None:
      app.fail("--adapter and --checkpoint both name the adapter to merge; pass one of them.")
    if _CHECKPOINT.value is None and _MODEL.value is None:
      app.fail("pass --model (a base model, with --adapter to merge) or --checkpoint (a self-play workdir).")
    export.check_out_dir(_OUT.value, _OVERWRITE.value)   # before anything slow is read
    if _CHECKPOINT.value is not None:
      source = export.from_workdir(_CHECKPOINT.value, base=_MODEL.value)
    else:
      source = export.Source(base=_MODEL.value, adapter=adapter)
    loaded = export.prepare(source, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  export.write(loaded, _OUT.value, dtype=_DTYPE.value, source=source, overwrite=_OVERWRITE.value)
  print(f"exported {source.base}" + (f" + {source.adapter}" if source.adapter else "")
        + f" ({_DTYPE.value}) to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
