"""Ahead-of-time compilation of the shipped kernels for Hopper (sm_90), no GPU needed.

    python -m rlsc_kernels.kernels.aot        # prints registers, spills, shared memory, wgmma

The interpreter accepts code that the real compiler rejects; compiling every kernel at the block
sizes we ship, for the GPU we target, catches that on a CPU-only machine. The report reads the
PTX (does it use wgmma?) and the cubin (registers, stack frame = spills) with the cuobjdump
that ships inside Triton's wheel.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List

TARGET_ARCH = 90

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class CompileReport:
    kernel: str
    dtype: str
    flags: str
    block: str
    registers: int
    spill_bytes: int  # stack frame + local memory: where spilled registers go
    shared_bytes: int
    uses_wgmma: bool
    has_barrier: bool = False  # a CTA-wide barrier (bar.sync) in the PTX

    def row(self) -> str:
        return (f"{self.kernel:<17} {self.dtype:<5} {self.block:<18} {self.flags:<36} regs={self.registers:<4} "
                f"spills={self.spill_bytes:<5} smem={self.shared_bytes:<7} wgmma={'yes' if self.uses_wgmma else 'no'}")


def _forward_signature(ty: str):
    sig = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i64"}
    for name in ("part_max_ptr", "part_sum_ptr", "part_zsum_ptr", "part_target_ptr"):
        sig[name] = "*fp32"
    for name in ("N", "V", "D", "vblocks_per_split", "stride_hn", "stride_hd", "stride_wv", "stride_wd"):
        sig[name] = "i32"
    sig["inv_temperature"] = "fp32"
    sig["softcap"] = "fp32"
    return sig


def _backward_signature(ty: str):
    sig = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i64"}
    for name in ("lse_ptr", "logp_ptr", "mean_z_ptr", "grad_logp_ptr", "grad_entropy_ptr", "dhidden_ptr", "dweight_ptr",
                 "dbias_ptr"):
        sig[name] = "*fp32"
    for name in ("N", "D", "v_lo", "v_hi", "stride_hn", "stride_hd", "stride_wv", "stride_wd", "stride_dhn", "stride_dwv"):
        sig[name] = "i32"
    sig["inv_temperature"] = "fp32"
    sig["filter_eps"] = "fp32"
    sig["softcap"] = "fp32"
    return sig


def _grad_logits_signature(ty: str):
    sig = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i64"}
    for name in ("lse_ptr", "logp_ptr", "mean_z_ptr", "grad_logp_ptr", "grad_entropy_ptr"):
        sig[name] = "*fp32"
    sig.update(grad_logits_ptr=f"*{ty}", tile_mask_ptr="*i8", dbias_ptr="*fp32")
    for name in ("N", "D", "v_lo", "v_hi", "n_vblocks", "stride_hn", "stride_hd", "stride_wv", "stride_wd", "stride_gn"):
        sig[name] = "i32"
    sig["inv_temperature"] = "fp32"
    sig["filter_eps"] = "fp32"
    sig["softcap"] = "fp32"
    return sig


def _grad_weight_signature(ty: str):
    sig = {"grad_logits_ptr": f"*{ty}", "hidden_ptr": f"*{ty}", "tile_mask_ptr": "*i8", "dweight_ptr": f"*{ty}",
           "scale_ptr": "*fp32"}
    for name in ("N", "D", "VS", "n_mask_vblocks", "stride_gn", "stride_hn", "stride_hd", "stride_dwv"):
        sig[name] = "i32"
    return sig


def _grad_hidden_signature(ty: str):
    sig = {"grad_logits_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "tile_mask_ptr": "*i8", "dhidden_ptr": "*fp32"}
    for name in ("N", "D", "VS", "n_mask_vblocks", "stride_gn", "stride_wv", "stride_wd", "stride_dhn"):
        sig[name] = "i32"
    return sig


def _single_pass_stats_signature(ty: str):
    # the logits block is fp32 whatever the input dtype; the bias has the input dtype
    sig = {"logits_ptr": "*fp32", "bias_ptr": f"*{ty}", "targets_ptr": "*i64"}
    for name in ("lse_ptr", "logp_ptr", "mean_z_ptr", "entropy_ptr"):
        sig[name] = "*fp32"
    sig.update(n_rows="i32", V="i32", stride_ln="i32", inv_temperature="fp32", ignore_index="i32")
    return sig


def _single_pass_grad_signature(ty: str):
    # 16-bit inputs: the gradient is written over the fp32 logits block as 16-bit values
    sig = {"logits_ptr": "*fp32", "grad_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i64",
           "lse_ptr": "*fp32", "logp_ptr": "*fp32", "coef_ptr": "*fp32"}
    sig.update(n_rows="i32", V="i32", stride_ln="i32", stride_gn="i32", inv_temperature="fp32")
    return sig


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame (spills land there) and static shared memory of the real cubin,
    read with the cuobjdump that ships inside Triton's wheel."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text))
    return {"registers": int(fields.get("REG", -1)), "spill_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))}


def compile_kernel(kernel: str, dtype: str, config, flags: Dict[str, bool], arch: int = TARGET_ARCH) -> CompileReport:
    """Compiles one kernel variant for sm_{arch}; raises if the compiler rejects it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backward_sweep import backward_sweep_kernel
    from .configs import GRAD_LOGITS_CONFIGS, MATMUL_BLOCK_K, dtype_key
    from .forward_sweep import forward_sweep_kernel
    from .grad_logits import grad_logits_kernel
    from .grad_matmul import grad_hidden_kernel, grad_weight_kernel
    from .single_pass_grad import single_pass_grad_kernel
    from .single_pass_stats import single_pass_stats_kernel

    ty = _DTYPE_NAMES[dtype]
    precision = "ieee"
    constexprs = {"EVEN_D": flags.get("EVEN_D", True), "DOT_UPCAST": False, "DOT_PRECISION": precision,
                  "BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_D": getattr(config, "block_d", 0),
                  "HAS_BIAS": flags.get("HAS_BIAS", False), "HAS_ENTROPY": flags.get("HAS_ENTROPY", False),
                  "SOFTCAP": flags.get("SOFTCAP", False)}
    if kernel in ("single_pass_stats", "single_pass_grad"):
        constexprs = {"HAS_BIAS": flags.get("HAS_BIAS", False), "BLOCK_N": config.block_n, "BLOCK_V": config.block_v}
        if kernel == "single_pass_stats":
            fn, sig = single_pass_stats_kernel, _single_pass_stats_signature(ty)
            constexprs["HAS_ENTROPY"] = flags.get("HAS_ENTROPY", False)
        else:
            fn, sig = single_pass_grad_kernel, _single_pass_grad_signature(ty)
            constexprs["ROUND_BF16_RTNE"] = False
    elif kernel in ("grad_weight", "grad_hidden"):
        tile = GRAD_LOGITS_CONFIGS["fp32" if dtype == "float32" else "16bit"]
        constexprs = {"USE_MASK": flags.get("USE_MASK", True), "DOT_UPCAST": False, "DOT_PRECISION": precision,
                      "BLOCK_D": config.block_d, "BLOCK_K": MATMUL_BLOCK_K[dtype_key(dtype == "float32")],
                      "MASK_BLOCK_N": tile.block_n, "MASK_BLOCK_V": tile.block_v}
        if kernel == "grad_weight":
            fn, sig = grad_weight_kernel, _grad_weight_signature(ty)
            constexprs["BLOCK_V"] = config.block_n
        else:
            fn, sig = grad_hidden_kernel, _grad_hidden_signature(ty)
            constexprs["BLOCK_N"] = config.block_n
    elif kernel == "grad_logits":
        fn, sig = grad_logits_kernel, _grad_logits_signature(ty)
        constexprs.update(GROUP_N=config.group_n, HAS_LOGP=True, COMPUTE_DB=flags.get("COMPUTE_DB", False), FILTER=flags.get("FILTER", True),
                          ZERO_SKIPPED=flags.get("ZERO_SKIPPED", True))
    elif kernel == "forward_sweep":
        fn, sig = forward_sweep_kernel, _forward_signature(ty)
        constexprs["GROUP_N"] = config.group_n
    elif kernel == "backward_sweep":
        fn, sig = backward_sweep_kernel, _backward_signature(ty)
        constexprs.update(HAS_LOGP=True, COMPUTE_DH=flags.get("COMPUTE_DH", True), COMPUTE_DW=flags.get("COMPUTE_DW", True),
                          COMPUTE_DB=flags.get("COMPUTE_DB", False), FILTER=flags.get("FILTER", True),
                          GROUP_N=config.group_n)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    for name in constexprs:
        sig[name] = "constexpr"
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": getattr(config, "num_stages", 1)})
    ptx = compiled.asm["ptx"]
    res = _resource_usage(compiled.asm["cubin"])
    shared = int(getattr(compiled.metadata, "shared", -1))
    shown = ",".join(k for k, v in sorted(flags.items()) if v)
    if kernel in ("single_pass_stats", "single_pass_grad"):
        block = f"{config.block_n}x{config.block_v}/w{config.num_warps}"
    elif kernel in ("grad_weight", "grad_hidden"):
        block = f"{config.block_n}x{config.block_d}xK{constexprs['BLOCK_K']}/w{config.num_warps}s{config.num_stages}"
    else:
        block = f"{config.block_n}x{config.block_v}x{config.block_d}/w{config.num_warps}s{config.num_stages}"
    barrier = re.search(r"\b(bar|barrier)\.sync\b", ptx) is not None
    return CompileReport(kernel, ty, shown, block, res["registers"], res["spill_bytes"], shared, "wgmma" in ptx, barrier)


def shipped_variants() -> List[tuple]:
    """(kernel, dtype, config, flags) for every shipped block size and the flag combinations that matter."""
    from .configs import BACKWARD_CONFIGS, FORWARD_CONFIGS, GRAD_LOGITS_CONFIGS, MATMUL_CONFIGS, SINGLE_PASS_CONFIGS

    out = []
    for dtype in ("bfloat16", "float16", "float32"):
        key = "fp32" if dtype == "float32" else "16bit"
        for flags in ({"HAS_BIAS": False, "HAS_ENTROPY": False, "EVEN_D": True},
                      {"HAS_BIAS": True, "HAS_ENTROPY": True, "EVEN_D": False}):
            out.append(("forward_sweep", dtype, FORWARD_CONFIGS[key], flags))
        for flags in ({"FILTER": True, "COMPUTE_DH": True, "COMPUTE_DW": True, "EVEN_D": True},
                      {"FILTER": False, "COMPUTE_DH": True, "COMPUTE_DW": True, "COMPUTE_DB": True,
                       "HAS_BIAS": True, "HAS_ENTROPY": True, "EVEN_D": False}):
            out.append(("backward_sweep", dtype, BACKWARD_CONFIGS[key], flags))
        for flags in ({"FILTER": True, "ZERO_SKIPPED": True, "EVEN_D": True},
                      {"FILTER": True, "ZERO_SKIPPED": False, "EVEN_D": True},
                      {"FILTER": False, "COMPUTE_DB": True, "HAS_BIAS": True, "HAS_ENTROPY": True, "EVEN_D": False}):
            out.append(("grad_logits", dtype, GRAD_LOGITS_CONFIGS[key], flags))
        for kernel in ("grad_weight", "grad_hidden"):
            for flags in ({"USE_MASK": True}, {"USE_MASK": False}):
                out.append((kernel, dtype, MATMUL_CONFIGS[key], flags))
        for flags in ({"HAS_BIAS": False, "HAS_ENTROPY": False}, {"HAS_BIAS": True, "HAS_ENTROPY": True}):
            out.append(("single_pass_stats", dtype, SINGLE_PASS_CONFIGS["stats"], flags))
        for flags in ({"HAS_BIAS": False}, {"HAS_BIAS": True}):
            out.append(("single_pass_grad", dtype, SINGLE_PASS_CONFIGS["grad"], flags))
    return out


def main(argv=None) -> None:
    import argparse
    import json
    from dataclasses import asdict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per kernel variant")
    args = parser.parse_args(argv)
    for kernel, dtype, config, flags in shipped_variants():
        report = compile_kernel(kernel, dtype, config, flags)
        print(json.dumps(asdict(report)) if args.json else report.row(), flush=True)


if __name__ == "__main__":
    main()
