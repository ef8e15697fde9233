"""Summarizes the instance-target runs (experiments/instances/run.sh) as a markdown table."""
import glob, json, os, sys

out = sys.argv[1]
rows = []
for f in sorted(glob.glob(os.path.join(out, "*.eval.json"))):
    name = os.path.basename(f)[:-len(".eval.json")]
    d = json.load(open(f))
    o = {round(x["threshold"], 2): x for x in d["objects"]["thresholds"]}
    rows.append((name, d["summary"]["mean_fg_dice"]["mean"], o[0.5]["n_true"], o[0.5]["n_pred"],
                 o[0.5]["ap"], o[0.75]["ap"], o[0.9]["ap"], o[0.5]["f1"], o[0.5]["pq"], o[0.5]["mean_matched_iou"]))
print("| run | Dice | true cells | predicted | AP@0.5 | AP@0.75 | AP@0.9 | F1@0.5 | PQ@0.5 | matched IoU |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.3f} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]:.3f} | {r[9]:.3f} |")
