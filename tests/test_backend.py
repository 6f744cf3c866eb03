"""int_lm.backend.cpu_flags: what the CPU offers for int8 work, from /proc/cpuinfo (or nothing)."""
from int_lm import backend

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2
"""

EPYC = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 asimddp sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_reports_the_int8_relevant_flags_in_a_fixed_order(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86)
    info = backend.cpu_flags(path)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                             "amx_tile", "amx_int8", "amx_bf16"]  # the first processor's; fpu, sse2 left out
    assert info["source"] == str(path)
    path.write_text(EPYC)
    info = backend.cpu_flags(path)
    assert info["flags"] == ["avx2", "fma"] and "avx512_vnni" not in info["flags"]
    assert "AMD EPYC 7B12" in backend.describe_cpu(info) and "avx2 fma" in backend.describe_cpu(info)


def test_arm_features_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM)
    info = backend.cpu_flags(path)
    assert info["flags"] == ["asimd", "asimddp", "i8mm", "sve", "bf16"]
    assert info["model"]  # no model name line: falls back to platform's


def test_without_cpuinfo_flags_are_unknown_not_absent(tmp_path):
    info = backend.cpu_flags(tmp_path / "missing")
    assert info["source"] is None and info["flags"] == [] and info["model"]
    assert "flags unknown" in backend.describe_cpu(info)


def test_this_machine():
    info = backend.cpu_flags()
    assert set(info) == {"model", "arch", "cpus", "flags", "source"}
    assert all(f in backend.INT8_GEMM_FLAGS for f in info["flags"])
