"""A chat model loads and serves without torchao or scipy.optimize in the process, and what
transformers would have imported from them still works when something calls it.

Run in fresh interpreters: this test process has imported both long ago."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_fp32_model_loads_chats_and_serves_without_torchao_or_scipy():
    seen = _run(
        """
        import json, sys
        import workbench
        from workbench.serve.app import ServerSettings, create_app

        deferred = ("torchao", "scipy.optimize")
        after_import = sorted(m for m in deferred if m in sys.modules)
        session = workbench.load("configs/default.yaml")
        reply = session.chat("Hi", max_tokens=4, temperature=0)
        create_app(session, ServerSettings(model_name="m"), own_thread=False)
        print(json.dumps({"after_import": after_import,
                          "after_serving": sorted(m for m in deferred if m in sys.modules),
                          "reply": reply.text}))
        """
    )
    assert seen["after_import"] == [] and seen["after_serving"] == [], seen
    assert seen["reply"]


def test_the_deferred_names_import_the_real_modules_when_called():
    seen = _run(
        """
        import json, sys
        import numpy as np
        import workbench
        from transformers.loss import loss_for_object_detection as detection
        from transformers.quantizers import quantizer_torchao

        rows, cols = detection.linear_sum_assignment(np.array([[4.0, 1.0], [2.0, 8.0]]))
        flat, meta = quantizer_torchao.flatten_tensor_state_dict({})
        import torchao, scipy.optimize
        print(json.dumps({
            "assignment": [rows.tolist(), cols.tolist()],
            "meta": meta,
            "real": [type(sys.modules[m]).__name__ for m in ("torchao", "scipy.optimize")],
            "torchao_file": torchao.__file__ is not None,
        }))
        """
    )
    assert seen["assignment"] == [[0, 1], [1, 0]]
    assert seen["meta"] == {"tensor_names": "[]"}
    assert seen["real"] == ["module", "module"] and seen["torchao_file"]


def test_an_int4_model_imports_torchao_itself():
    seen = _run(
        """
        import json, sys
        import workbench
        session = workbench.load("configs/int4.yaml")
        reply = session.chat("Hi", max_tokens=4, temperature=0)
        print(json.dumps({"torchao": "torchao" in sys.modules, "reply": reply.text}))
        """
    )
    assert seen["torchao"] and seen["reply"]
