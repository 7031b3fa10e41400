"""Writes the /predict request bodies of benches/predict.sh from the dataset's CSV:
one.json (the first row, in a list) and batch.json (every row, in a list)."""
import csv
import json
import sys

INTEGER = {"CustomerAge", "TransactionDuration", "LoginAttempts"}
DECIMAL = {"TransactionAmount", "AccountBalance"}

src, out = sys.argv[1], sys.argv[2]
with open(src, newline="") as f:
    rows = [
        {k: int(v) if k in INTEGER else float(v) if k in DECIMAL else v for k, v in r.items()}
        for r in csv.DictReader(f)
    ]
with open(f"{out}/one.json", "w") as f:
    json.dump(rows[:1], f)
with open(f"{out}/batch.json", "w") as f:
    json.dump(rows, f)
print(f"{len(rows)} transactions", file=sys.stderr)
