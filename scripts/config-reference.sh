#!/usr/bin/env bash
# Writes `saiki-relay --help-config` into docs/configuration.md (the toml block), after a key
# was added or changed; relay/tests/it/docs.rs checks that the two agree.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build -q -p saiki-relay
./target/debug/saiki-relay --help-config > /tmp/saiki-help-config.$$
python3 - /tmp/saiki-help-config.$$ <<'PY'
import sys
ref = open(sys.argv[1]).read().rstrip("\n")
p = "docs/configuration.md"
s = open(p).read()
a = s.index("```toml\n") + len("```toml\n")
b = s.index("\n```", a)
open(p, "w").write(s[:a] + ref + s[b:])
PY
rm -f /tmp/saiki-help-config.$$
echo "docs/configuration.md updated"
