#!/usr/bin/env bash
# `make test`: (1) notebooks clean and llama32_nb/ in sync, (2) every notebook via nbdev-test,
# (3) pytest tests/. Ends with one plain "N passed, N failed" line; exits non-zero on any failure.
set -u
cd "$(dirname "$0")/.."
passed=0; failed=0
ok()   { passed=$((passed+1)); echo "PASS: $*"; }
bad()  { failed=$((failed+1)); echo "FAIL: $*"; }

echo "== 1. notebooks clean and library in sync"
before=$(git status --porcelain -- nbs llama32_nb)
sync_out=$( { nbdev-clean && nbdev-export; } 2>&1 >/dev/null ); sync_rc=$?
after=$(git status --porcelain -- nbs llama32_nb)
if [ $sync_rc -ne 0 ]; then bad "nbdev-clean/nbdev-export did not run:"; echo "$sync_out" | tail -5 | sed 's/^/    /'
elif [ "$before" == "$after" ] && [ -z "$after" ]; then ok "nbdev-clean/nbdev-export leave nbs/ and llama32_nb/ unchanged"
elif [ "$before" == "$after" ]; then ok "nbdev-clean/nbdev-export change nothing (uncommitted work present:"; echo "$after" | sed 's/^/    /'
else bad "nbdev-clean/nbdev-export changed files (commit clean, exported notebooks):"; diff <(echo "$before") <(echo "$after") | sed -n 's/^> /    /p'; fi

echo "== 2. notebooks (nbdev-test; cells flagged '#| slow' are skipped)"
for nb in nbs/*.ipynb; do
  start=$SECONDS
  if out=$(nbdev-test "$nb" 2>&1); then ok "$nb ($((SECONDS-start)) s)"
  else bad "$nb ($((SECONDS-start)) s)"; echo "$out" | tail -40 | sed 's/^/    /'; fi
done

echo "== 3. pytest tests/"
rm -f test-results.xml
python -m pytest tests -q -p no:cacheprovider --junitxml=test-results.xml
rc=$?
if [ -f test-results.xml ]; then
  read -r t f e s < <(python - <<'PY'
import xml.etree.ElementTree as ET
r = ET.parse("test-results.xml").getroot()
suites = [r] if r.tag == "testsuite" else list(r)
g = lambda k: sum(int(s.get(k, 0)) for s in suites)
print(g("tests"), g("failures"), g("errors"), g("skipped"))
PY
)
  passed=$((passed + t - f - e - s)); failed=$((failed + f + e))
  rm -f test-results.xml
elif [ $rc -ne 5 ]; then bad "pytest did not run (exit $rc)"; fi
[ $rc -ne 0 ] && [ $rc -ne 5 ] && [ -z "${t:-}" ] && bad "pytest exit $rc"

echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
