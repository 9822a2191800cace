"""Model formats users bring, packed into the tinyserve layout (docs/repository.md section 4).

* ``sources``: compressed sources (gzip, bzip2, xz, zstd), detected by magic bytes and decompressed
  with a size limit before anything else reads them;
* ``torchscript``: a ``torch.jit.save`` archive (platform ``torchscript``);
* ``onnx_model``: an ONNX model (platform ``onnx``, the ``tinyserve[onnx]`` extra);
* ``hf``: a Hugging Face model directory (platform ``hf``, the ``tinyserve[hf]`` extra).

Each format module has a ``pack_*`` function (source -> tensors for the weights file, a program file
without them, and the config fields it could learn) and a ``load_*`` function (version directory +
the weights tinyserve mapped or decoded -> a callable ``torch.nn.Module`` that uses those tensors'
memory).  The weights are read once, by tinyserve.
"""

from __future__ import annotations

import importlib

# platform -> (module, loader function); imported when a version of that platform loads
FORMAT_LOADERS = {"torchscript": ("torchscript", "load_torchscript"), "onnx": ("onnx_model", "load_onnx"),
                  "hf": ("hf", "load_hf")}


def load_format(config, version_dir, weights, device="cpu"):
    """(module, hooks) of a version whose platform is one of FORMAT_LOADERS; hooks is None or an
    object with ``preprocess`` / ``postprocess`` (docs/repository.md section 4.2's calling convention)."""
    mod_name, fn = FORMAT_LOADERS[config.platform]
    loader = getattr(importlib.import_module(f"tinyserve.formats.{mod_name}"), fn)
    out = loader(version_dir, weights, config.program, config=config, device=device)
    return out if isinstance(out, tuple) else (out, None)


# identify() kind -> (module, packer function)
FORMAT_PACKERS = {"torchscript": ("torchscript", "pack_torchscript"), "onnx": ("onnx_model", "pack_onnx"),
                  "hf_dir": ("hf", "pack_hf")}
DEFAULT_SOURCE_LIMIT = 64 << 30  # bytes a source may hold uncompressed (pack --max-source-bytes)


def pack_format(kind: str, path: str, out_dir, cfg: dict, limit: int = DEFAULT_SOURCE_LIMIT, **options):
    """Tensors for the weights file of a source of kind `kind`; writes the program into out_dir and
    fills cfg (platform, program, inputs, outputs)."""
    mod_name, fn = FORMAT_PACKERS[kind]
    packer = getattr(importlib.import_module(f"tinyserve.formats.{mod_name}"), fn)
    return packer(path, out_dir, cfg, limit, **options)
