"""Per-source-line table of an Nsight Compute SASS source page (CSV) using `nvdisasm -g` of the
same kernel compiled locally (addresses -> file:line). Usage: ncu_lines.py SASS_TXT MANGLED CSV [N]"""
import csv, re, sys, collections

def local_listing(sass_txt, mangled):
    """[(opcode, file:line)] of the kernel in the local disassembly, in address order."""
    out, cur, inside = [], None, False
    for ln in open(sass_txt):
        if ln.startswith(".text.") :
            inside = ln.strip().rstrip(":") == ".text." + mangled
            continue
        if not inside:
            continue
        g = re.search(r'//## File "([^"]+)", line (\d+)', ln)
        if g:
            cur = f"{g.group(1).split('/')[-1]}:{g.group(2)}"
            continue
        a = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if a:
            out.append((opcode(a.group(2)), cur or "?"))
    return out

def opcode(text):
    t = text.strip()
    if t.startswith("@"):
        t = t.split(None, 1)[1]
    return t.split()[0].split(".")[0] if t else ""

def main():
    sass_txt, mangled, path = sys.argv[1:4]
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    local = local_listing(sass_txt, mangled)
    rows = list(csv.reader(open(path)))
    hdr_i = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[hdr_i]
    col = {k: i for i, k in enumerate(hdr)}
    stall_cols = [k for k in hdr if k.startswith("stall_") and "(Not Issued)" not in k]
    inst = collections.Counter(); samp = collections.Counter(); stalls = collections.defaultdict(collections.Counter)
    tot_i = tot_s = 0; miss = 0
    body = [r for r in rows[hdr_i + 1:] if len(r) == len(hdr) and r[col["Address"]].startswith("0x")]
    # Align the profiled SASS with the local listing by opcode (the two builds differ slightly).
    import difflib
    prof_ops = [opcode(r[col["Source"]]) for r in body]
    sm = difflib.SequenceMatcher(None, prof_ops, [o for o, _ in local], autojunk=False)
    keys = ["?"] * len(body)
    for a0, b0, n in sm.get_matching_blocks():
        for i in range(n):
            keys[a0 + i] = local[b0 + i][1]
    last = "?"
    for i, k in enumerate(keys):  # unmatched rows take the line of the previous matched one
        if k == "?":
            keys[i] = last + "~"; miss += 1
        else:
            last = k
    for r, key in zip(body, keys):
        ni = float(r[col["Instructions Executed"]] or 0); ns = float(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        inst[key] += ni; samp[key] += ns; tot_i += ni; tot_s += ns
        for k in stall_cols:
            v = float(r[col[k]] or 0)
            if v: stalls[key][k[6:]] += v
    print(f"warp instructions {tot_i:.0f}, stall samples {tot_s:.0f}, rows not aligned (given the previous line, marked ~) {miss}")
    print(f"{'line':28s} {'%inst':>6s} {'%samp':>6s}  top stalls")
    for key, s in samp.most_common(top):
        st = ", ".join(f"{k}={v:.0f}" for k, v in stalls[key].most_common(3))
        print(f"{key:28s} {100*inst[key]/tot_i:6.1f} {100*s/tot_s:6.1f}  {st}")

main()
