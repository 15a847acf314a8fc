#!/usr/bin/env python3
"""The report of bench/quality.sh: one Markdown table (condition x speech sample: worst and
median PESQ-WB for Koe and baresip, worst and median mouth-to-ear for Koe, dropped calls), then
Koe's targets as pass/fail lines, each relative to the same speech's own clean-path score.

  quality_report.py RESULTS.tsv CONDITIONS.tsv SAMPLES.tsv PEERS

RESULTS.tsv, one call a line: condition key, sample, peer, seed, status (ok | dropped),
PESQ-WB, recording lag (ms), origin offset (ms), impair.py's JSON statistics, path (Koe),
path check (ok | wrong | -), seconds the call took, how far B's clock slipped (ms; Koe), note.
CONDITIONS.tsv: key, label, whether baresip runs (yes | no: why), in the order of the table.
SAMPLES.tsv: name, description, seconds.
"""
import json
import math
import sys

# Koe's targets (issue 12, item 5). PESQ: the worst call of the row must score at least the
# median of the same speech's clean direct calls minus this much.
PESQ_BELOW_CLEAN = {
    "random5": 0.1,
    "random10": 0.2,
    "random20": 0.4,
    "bursty10": 0.7,
    "tcp": 0.1,
    "tcp1": 0.1,
    "tls": 0.1,
    "tls1": 0.1,
}
# Mouth-to-ear: the worst call of the row at most this many ms ("<= 80 ms at 20 % loss" is
# applied to random and to bursty 20 %).
MOUTH_TO_EAR_MAX = {"clean": 30.0, "random20": 80.0, "bursty20": 80.0}
# Not a target of the issue, a check on the reference the targets are relative to: a clean
# direct call of natural speech scores well above this (4.2-4.5 here); below it, the recording
# is broken, and targets relative to it would flatter.
CLEAN_SANITY = 3.5
# A Koe daemon whose 20 ms clock fell behind the wall clock by more than this during a call
# was starved of CPU: the machine was busy, and that call measures the machine.
SLIP_MS = 100.0


def median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return math.nan
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def read_tsv(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def main():
    results_path, conditions_path, samples_path, peers = sys.argv[1:5]
    peers = peers.split()
    conditions = read_tsv(conditions_path)
    samples = read_tsv(samples_path)
    calls = {}
    for row in read_tsv(results_path):
        key, sample, peer = row[0], row[1], row[2]
        calls.setdefault((key, sample, peer), []).append({
            "seed": row[3], "status": row[4],
            "pesq": float(row[5]), "lag": float(row[6]), "origin": float(row[7]),
            "impair": json.loads(row[8]) if row[8] not in ("", "-") else None,
            "path": row[9], "path_check": row[10], "seconds": float(row[11]), "slip": float(row[12]),
            "note": row[13] if len(row) > 13 else "",
        })

    def scores(key, sample, peer):
        return [c["pesq"] for c in calls.get((key, sample, peer), []) if c["status"] == "ok" and not math.isnan(c["pesq"])]

    def mouth_to_ear(key, sample):
        return [c["lag"] - c["origin"] for c in calls.get((key, sample, "koe"), [])
                if c["status"] == "ok" and not math.isnan(c["lag"]) and not math.isnan(c["origin"])]

    def pair(values, fmt, low_is_worst=True, unit=""):
        if not values:
            return "—"
        worst = min(values) if low_is_worst else max(values)
        return f"{format(worst, fmt)} / {format(median(values), fmt)}{unit}"

    def dropped(key, sample, peer):
        row = calls.get((key, sample, peer), [])
        return sum(c["status"] != "ok" for c in row), len(row)

    def impairer(key, sample):
        stats = [c["impair"] for c in calls.get((key, sample, "koe"), []) if c["impair"]]
        if not stats:
            return "—"
        parts = []
        for direction in ("a_to_b", "b_to_a"):
            seen = sum(s[direction]["seen"] for s in stats)
            lost = sum(s[direction]["dropped"] for s in stats)
            parts.append(f"{100.0 * lost / seen if seen else 0.0:.1f} % of {seen}")
        return " / ".join(parts)

    clean = {sample: median(scores("clean", sample, "koe")) for sample, *_ in samples}
    target_lines = []
    verdicts = {}
    for key, label, _ in conditions:
        for sample, *_ in samples:
            if not calls.get((key, sample, "koe")):
                continue
            checks = []
            lost, total = dropped(key, sample, "koe")
            checks.append((f"{lost} dropped", f"no call dropped: {lost} of {total} dropped", lost == 0))
            slipped = sum(c["slip"] > SLIP_MS for c in calls[(key, sample, "koe")])
            if slipped:
                checks.append((f"clock slipped in {slipped}", f"B's clock kept time (slip ≤ {SLIP_MS:.0f} ms; a check on the machine): {slipped} call(s) slipped", False))
            wrong = sum(c["path_check"] == "wrong" for c in calls[(key, sample, "koe")])
            if wrong:
                checks.append((f"{wrong} off the intended path", f"every call on the path the condition means: {wrong} of {total} were not", False))
            if key == "clean":
                values = scores(key, sample, "koe")
                if values and min(values) < CLEAN_SANITY:
                    checks.append((f"a clean call at {min(values):.2f}",
                                   f"every clean call ≥ {CLEAN_SANITY} (a sanity check, not the issue's target: is it speech?): worst {min(values):.2f}", False))
            if key in PESQ_BELOW_CLEAN:
                allowance = PESQ_BELOW_CLEAN[key]
                values = scores(key, sample, "koe")
                if math.isnan(clean[sample]):
                    checks.append(("", f"worst PESQ-WB ≥ clean − {allowance}: no clean calls of this speech to compare with", None))
                elif clean[sample] < CLEAN_SANITY:
                    checks.append(("", f"worst PESQ-WB ≥ clean − {allowance}: the clean reference {clean[sample]:.2f} is itself broken (< {CLEAN_SANITY})", None))
                elif lost:
                    checks.append(("PESQ (a call dropped)", f"worst PESQ-WB ≥ {clean[sample] - allowance:.2f} (clean {clean[sample]:.2f} − {allowance}): a call was dropped", False))
                else:
                    worst = min(values)
                    checks.append((f"PESQ {worst:.2f} < {clean[sample] - allowance:.2f}",
                                   f"worst PESQ-WB {worst:.2f} ≥ {clean[sample] - allowance:.2f} (clean {clean[sample]:.2f} − {allowance})",
                                   worst >= clean[sample] - allowance - 1e-9))
            if key in MOUTH_TO_EAR_MAX:
                limit = MOUTH_TO_EAR_MAX[key]
                values = mouth_to_ear(key, sample)
                if values:
                    checks.append((f"mouth-to-ear {max(values):.0f} > {limit:.0f} ms", f"worst mouth-to-ear {max(values):.0f} ms ≤ {limit:.0f} ms", max(values) <= limit))
                else:
                    checks.append(("mouth-to-ear not measured", f"mouth-to-ear ≤ {limit:.0f} ms: no call to measure", False))
            decided = [ok for _, _, ok in checks if ok is not None]
            passed = all(decided) if decided else None
            failing = [short for short, _, ok in checks if ok is False]
            verdicts[(key, sample)] = "pass" if passed else ("**fail**: " + "; ".join(failing) if passed is False else "n/a")
            if any(ok is None for _, _, ok in checks):
                verdicts[(key, sample)] += " (PESQ target n/a: no usable clean calls of this speech)"
            for _, text, ok in checks:
                mark = "pass" if ok else ("FAIL" if ok is False else "n/a")
                target_lines.append(f"- {label}, {sample}: {text}: **{mark}**" if ok is False else f"- {label}, {sample}: {text}: {mark}")

    print("| condition | speech | Koe PESQ-WB worst / median | baresip PESQ-WB worst / median | Koe mouth-to-ear worst / median | calls dropped (Koe; baresip) | packets dropped by impair.py, Koe calls (→ / ←) | Koe's targets |")
    print("|---|---|---|---|---|---|---|---|")
    footnotes = {}
    for key, label, baresip in conditions:
        for sample, *_ in samples:
            if not calls.get((key, sample, "koe")) and not calls.get((key, sample, "baresip")):
                continue
            koe = pair(scores(key, sample, "koe"), ".2f") if "koe" in peers else "not run"
            lost, total = dropped(key, sample, "koe")
            drops = f"{lost} of {total}" if total else "—"
            if "baresip" not in peers:
                bare = "not run (PEERS)"
                drops += "; —"
            elif baresip != "yes":
                mark = footnotes.setdefault(baresip, len(footnotes) + 1)
                bare = f"not run [{mark}]"
                drops += "; —"
            else:
                bare = pair(scores(key, sample, "baresip"), ".2f")
                b_lost, b_total = dropped(key, sample, "baresip")
                drops += f"; {b_lost} of {b_total}"
            wrong = sum(c["path_check"] == "wrong" for c in calls.get((key, sample, "koe"), []))
            if wrong:
                koe += f" (**{wrong} call(s) not on the intended path**)"
            slipped = sum(c["slip"] > SLIP_MS for c in calls.get((key, sample, "koe"), []))
            if slipped:
                koe += f" (**clock slipped in {slipped} call(s)**)"
            m2e = pair(mouth_to_ear(key, sample), ".0f", low_is_worst=False, unit=" ms") if "koe" in peers else "—"
            print(f"| {label} | {sample} | {koe} | {bare} | {m2e} | {drops} | {impairer(key, sample)} | {verdicts.get((key, sample), '—')} |")
    print("\n→ / ←: for UDP conditions A→B / B→A; for relay conditions the TCP packets towards / back from"
          " the relays' TCP (TLS) ports, summed over Koe's calls.")
    for why, mark in footnotes.items():
        print(f"\n[{mark}] baresip: {why}")
    print()
    print("Koe's targets, relative to each speech's own clean direct calls (median of this run):")
    print()
    for line in target_lines:
        print(line)
    rows = [v for v in verdicts.values() if "n/a" not in v]
    if rows:
        undecided = len(verdicts) - len(rows)
        print(f"\n{sum(v == 'pass' for v in rows)} of {len(rows)} rows meet all their targets"
              + (f" ({undecided} more could not be judged: no usable clean calls of their speech)." if undecided else "."))

    # What each dropped call or call on the wrong path said, and how long calls took.
    odd = [(key, sample, peer, c) for (key, sample, peer), row in calls.items() for c in row
           if c["status"] != "ok" or c["path_check"] == "wrong" or c["slip"] > SLIP_MS]
    if odd:
        print("\nDropped calls, calls on the wrong path, calls whose receiving daemon's clock slipped:")
        labels = {key: label for key, label, _ in conditions}
        for key, sample, peer, c in odd:
            print(f"- {labels.get(key, key)}, {sample}, {peer}, seed {c['seed']}: {c['status']}; path {c['path'] or '?'}; {c['note']}")
    for peer in ("koe", "baresip"):
        took = [c["seconds"] for (k, s, p), row in calls.items() if p == peer for c in row]
        if took:
            print(f"\n{peer}: {len(took)} calls, {sum(took) / len(took):.1f} s each on average (call, recording and scoring), {sum(took) / 60:.1f} min in all.", end="")
    print()


if __name__ == "__main__":
    main()
