"""Plugin-side helpers for WebAssembly plugins, one folder per language.

- `c/dataflare_plugin.h`: a header for C (built with Zig's C compiler);
- `zig/dataflare.zig`: a Zig module;
- `assemblyscript/dataflare/index.ts`: an AssemblyScript library.

Each declares the Extism kernel functions a plugin needs and reads and
writes the v1 batch encoding (`docs/plugin-batch-encoding.md`).
"""

from __future__ import annotations

from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent
C_INCLUDE_DIR = SDK_DIR / "c"
ZIG_MODULE = SDK_DIR / "zig" / "dataflare.zig"
ASSEMBLYSCRIPT_PATH = SDK_DIR / "assemblyscript"
"""Pass to `asc --path` so that `import ... from "dataflare"` resolves."""
ASSEMBLYSCRIPT_ABORT = "~lib/dataflare/index/dataflareAbort"
"""Pass to `asc --use abort=...`: the SDK's abort handler."""
