"""`python -m kontext_core inspect` on files in the real layouts."""

from __future__ import annotations

import json

from kontext_core import save_autoencoder, save_transformer
from kontext_core.cli import main


def test_inspect_reports_layout_and_config_and_runs(tiny_transformer, capsys, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "k.safetensors", layout="comfy", weights="fp8_e4m3fn_scaled")
    assert main(["inspect", str(tmp_path / "k.safetensors"), "--run", "--dtype", "fp8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["kind"] == "transformer" and report["layout"] == "bfl"
    assert report["prefix"] == "model.diffusion_model." and report["scaled_fp8"] is True
    assert report["config"]["hidden_size"] == 128 and report["storage_dtypes"]["F8_E4M3"] == 26 + 1  # block linears + the scaled_fp8 marker
    assert "finite=True" in out


def test_inspect_diffusers_vae_folder(tiny_autoencoder, capsys, tmp_path):
    save_autoencoder(tiny_autoencoder, tmp_path / "vae", layout="diffusers")
    assert main(["inspect", str(tmp_path), "--run", "--dtype", "fp32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert '"kind": "autoencoder"' in out and '"layout": "diffusers"' in out
    assert "encode [1, 3, 64, 64] -> [1, 16, 32, 32]" in out


def test_inspect_bad_file_exits_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(32))
    assert main(["inspect", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF file" in capsys.readouterr().err
