"""The printed tables of a run's figures, and the ratios against a previous run's JSON."""
from __future__ import annotations


def _fmt(s: dict) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['median']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f}   (n={s['n']})"


def _headroom_note(h: float) -> str:
    return "  SLOWER THAN REAL TIME" if h > 1 else ""


def report_sessions(figures: dict) -> str:
    """The multi-session table of measure_sessions' figures."""
    lines = [f"several sessions on one Runtime: {figures['recording']} ({figures['audio_seconds']:.1f} s) in each, "
             f"fed in {figures['piece_seconds']:.1f} s pieces as fast as taken; policy: {figures['policy']}",
             f"  single-session reference: {figures['reference_decisions']} decisions, "
             f"{figures['reference_replies']} replies",
             f"  {'sessions':>8s} {'chunks/s':>9s} {'x real time':>11s} {'wall s':>7s}  "
             f"{'step ms: median (min..max)':>28s} {'KV/session':>12s} {'same as 1 session':>18s}"]
    for row in figures["runs"].values():
        step = row["step_ms"]
        steps = f"{step['median']:.3f} ({step['min']:.3f}..{step['max']:.3f})"
        same = f"{row['identical_to_single_session']}/{row['sessions']}"
        lines.append(f"  {row['sessions']:8d} {row['chunks_per_s']:9.1f} {row['real_time_streams']:11.1f} "
                     f"{row['wall_s']:7.2f}  {steps:>28s} {row['kv_bytes_per_session'] / 2**20:8.2f} MiB {same:>18s}")
        for difference in row["differences"]:
            lines.append(f"      DIFFERS: {difference}")
        if row["dropped_chunks"] or row["dropped_samples"] or row["dropped_events"]:
            lines.append(f"      dropped: {row['dropped_chunks']} chunks, {row['dropped_samples']} samples, "
                         f"{row['dropped_events']} events")
    return "\n".join(lines)


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"listenloop bench: {env['model']} ({env['precision']} decoder, {env['layers']} layers, hidden {env['hidden_size']})"]
    if results.get("command"):
        lines.append(f"  command: {results['command']}")
    lines += [f"  device {env['device']} | {','.join(env['providers'])} | ORT {env['onnxruntime']} | "
              f"{env['physical_cores']} physical cores, intra-op {env['intra_op_threads']} | load {env['load_average'][0]:.2f}"]
    if "listening" in results:
        lines += ["  replies forced with speak_bias=+50 and scripted to a fixed length; listening scripted never "
                  "to speak (p_speak near 1, so no quiet-moment context resets)",
                  "", f"{'figure (ms)':34s} {'median':>8s} {'p90':>8s} {'p99':>8s}"]
        lis = results["listening"]
        for name, key in (("mel (C++)", "mel_ms"), ("encoder", "encoder_ms"), ("decoder listening step", "decoder_step_ms"),
                          ("listening step (mel+enc+dec)", "step_ms")):
            lines.append(f"{name:34s} {_fmt(lis[key])}")
        lines.append(f"{'  real-time headroom (step/0.4 s)':34s} {lis['headroom']:8.4f} (p99 {lis['headroom_p99']:.4f})"
                     f"{_headroom_note(lis['headroom'])}")
    if "catch_up" in results:
        cu = results["catch_up"]
        lines.append(f"{'catch-up step per chunk (enc+dec)':34s} {_fmt(cu['step_ms_per_chunk'])}  "
                     f"[{cu['chunks']} chunks after a {cu['reply_tokens']}-token reply, one step each]")
        lines.append(f"{'  first one (after TEXT_END)':34s} {_fmt(cu['first_step_ms'])}")
        lines.append(f"{'  all {0} chunks'.format(cu['chunks']):34s} {_fmt(cu['total_ms'])}")
        lines.append(f"{'  headroom after a reply':34s} {cu['headroom']:8.4f}{_headroom_note(cu['headroom'])}")
    if "scheduler_ms" in results:
        lines.append(f"{'scheduler (last sample -> mel)':34s} {_fmt(results['scheduler_ms'])}")
    if "reply" in results:
        rep = results["reply"]
        lines.append(f"{'TEXT_BEGIN -> first text token':34s} {_fmt(rep['first_token_ms'])}")
        lines.append(f"{'TTFR on a stream (enc+dec+1st)':34s} {_fmt(rep['engine_ttfr_ms'])}")
        split = results["ttfr_split_ms"]
        lines.append("TTFR split (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
                     + f" = {results['ttfr_components_sum_ms']:.3f} ms")
    if "session" in results:
        s = results["session"]
        lines.append(f"{'TTFR end to end (Session, 20 ms)':34s} {_fmt(s['ttfr_ms'])}  "
                     f"[{s['replies']} replies, {s['stale_triggers']} catch-up triggers excluded]")
        for name, fig in s["ttfr_split_ms"].items():
            lines.append(f"{'  ' + name.replace('_', ' '):34s} {_fmt(fig)}")
    if "reply" in results:
        rep = results["reply"]
        lines.append(f"reply decode: {rep['tokens_per_s']['median']:.1f} tokens/s median ({rep['reply_tokens']}-token replies)")
    if "startup" in results:
        st, mem = results["startup"], results.get("memory", {})
        line = (f"start-up: load {st['load_ms']:.1f} ms, first decision {st['first_decision_ms']:.1f} ms | "
                f"KV cache {st['kv_bytes_per_stream'] / 2**20:.2f} MiB per stream")
        if mem:
            line += (f" | peak RSS {mem['peak_rss_mb_at_start']:.0f} MiB at start, "
                     f"{mem['peak_rss_mb_after_stream']:.0f} MiB after the run")
        lines.append(line)
    if "context" in results:
        lines.append("step vs context (decoder listen only):")
        for row in results["context"]:
            if "skipped" in row:
                lines.append(f"  {row['context']:6d} tokens: skipped ({row['skipped']})")
            else:
                lines.append(f"  {row['context']:6d} tokens: {_fmt(row['step_ms'])}  [mean {row['mean_position']:.0f} cached]")
    for row in results.get("precisions", []):
        lines.append(f"  precision {row['precision']:5s}: decoder step {row['decoder_step_ms']['median']:.3f} ms, "
                     f"listening step {row['step_ms']['median']:.3f} ms, headroom {row['headroom']:.4f}{_headroom_note(row['headroom'])}")
    if "sessions" in results:
        lines.append(report_sessions(results["sessions"]))
    if "torch" in results:
        t = results["torch"]
        lines.append(f"PyTorch side by side (torch {t['torch']}, {t['torch_threads']} threads):")
        lines.append(f"  listening step  listenloop {t['listen_step_ms']['listenloop']['median']:.3f} ms, "
                     f"torch {t['listen_step_ms']['torch']['median']:.3f} ms -> {t['step_speedup']:.2f}x faster")
        lines.append(f"  TTFR-equivalent listenloop {t['ttfr_equivalent_ms']['listenloop']['median']:.3f} ms, "
                     f"torch {t['ttfr_equivalent_ms']['torch']['median']:.3f} ms -> {t['ttfr_speedup']:.2f}x faster")
        lines.append(f"  decisions agree {t['decisions_agree']}/{t['decisions']} ({t['both_spoke']} spoke on both)")
    return "\n".join(lines)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(results: dict, old: dict) -> str:
    """Ratios new/old of every median, headroom, speed and throughput figure both runs have."""
    new_f, old_f = _flatten(results), _flatten(old)
    keys = [k for k in new_f if k in old_f and (k.endswith(".median") or "headroom" in k or "speedup" in k
                                                 or k.endswith(".chunks_per_s")
                                                 or k.endswith("_ms") and k.startswith("startup"))
            and not k.startswith("environment") and old_f[k]]
    lines = [f"compared with {old.get('environment', {}).get('time_utc', 'the old run')} "
             f"({old.get('environment', {}).get('device', '?')}): new / old (< 1 is faster for times)"]
    for k in keys:
        lines.append(f"  {k:55s} {old_f[k]:10.3f} -> {new_f[k]:10.3f}   x{new_f[k] / old_f[k]:.3f}")
    return "\n".join(lines)
