"""The page a person opens at GET /: what is loaded, is it healthy, what it has been doing."""

from __future__ import annotations

import html
import time

import yaml

from workbench.models.memory import MemoryReport, megabytes
from workbench.serve.metrics import ServerMetrics
from workbench.session import Session


def render_status(
    session: Session, model_name: str, metrics: ServerMetrics, started: float, memory: MemoryReport
) -> str:
    """`memory` is Session.memory()'s split of one reading, so its parts add up to the figure
    shown: an int8 model's weights read as int8, a float32 copy left resident shows up as one."""
    info = session.loaded
    weights = ", ".join(
        f"{k} {megabytes(v)}" for k, v in sorted(memory.weights.items(), key=lambda kv: -kv[1]) if v >= 1e5
    )
    stale = (
        f", stale checkpoint pages {memory.stale_checkpoint_pages / 1e6:.0f} MB"
        if memory.stale_checkpoint_pages >= 1e6
        else ""
    )
    in_flight = metrics.active
    rows = (
        "".join(
            f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(r.at))}</td><td>{'stream' if r.stream else 'plain'}</td>"
            f"<td>{r.status}</td><td>{r.prompt_tokens}</td><td>{r.completion_tokens}</td>"
            f"<td>{'' if r.ttft_ms is None else f'{r.ttft_ms:.0f}'}</td>"
            f"<td>{'' if r.tokens_per_s is None else f'{r.tokens_per_s:.1f}'}</td><td>{html.escape(r.outcome)}</td></tr>"
            for r in metrics.recent
        )
        or '<tr><td colspan="8">no requests yet</td></tr>'
    )
    config = html.escape(yaml.safe_dump(session.config.model_dump(mode="json"), sort_keys=False))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>workbench server</title>
<meta http-equiv="refresh" content="5">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
.light {{ display: inline-block; width: .8rem; height: .8rem; border-radius: 50%; background: #2a2; margin-right: .4rem; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left; }}
pre {{ background: #f6f6f6; padding: .8rem; }} code {{ background: #f6f6f6; padding: 0 .2rem; }}
</style></head><body>
<h1><span class="light" id="health" title="healthy"></span>workbench server</h1>
<p>Serving <b>{html.escape(model_name)}</b> ({html.escape(info.source)}) on {html.escape(info.device)},
compute dtype {str(info.dtype).removeprefix("torch.")}, process memory {memory.rss / 1e9:.2f} GB: runtime {memory.runtime / 1e9:.2f} GB,
resident weights {memory.weight_total / 1e9:.2f} GB ({html.escape(weights or "none")}{stale}), KV cache {memory.kv_cache / 1e6:.0f} MB,
activations {memory.activations / 1e6:.0f} MB, unaccounted {memory.unaccounted / 1e6:.0f} MB; load peak {memory.load_peak / 1e9:.2f} GB;
context {session.engine.context_limit} tokens; {html.escape(session.media.describe())}. Up {time.time() - started:.0f} s, {in_flight} request(s) in flight.</p>
<p>OpenAI-compatible endpoint: <code>POST /v1/chat/completions</code> · <a href="/v1/models">/v1/models</a> ·
<a href="/health">/health</a> · <a href="/metrics">/metrics</a></p>
<h2>Recent requests</h2>
<table><tr><th>time</th><th>mode</th><th>status</th><th>prompt</th><th>reply</th><th>first token ms</th><th>tok/s</th><th>outcome</th></tr>
{rows}</table>
<h2>Config</h2><pre>{config}</pre>
</body></html>"""
