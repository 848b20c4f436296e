"""The huggingface_hub versions the download tests run against, and ``python -m tests.hub_clients``, which installs
the missing ones (each into its own folder ``.venv-hub/<version>/``, with its own dependencies; nothing else changes).

- 0.17.3: the oldest tested (Sept 2023), the declared lower bound;
- 0.25.2: this project's test pin (``requirements-test.txt``, in .venv-test; tested without a folder); reForge:
  0.25.0;
- 0.26.2: Forge's pin;
- 0.36.2: the newest 0.x, which A1111 1.6-1.10 resolves (it pins no huggingface_hub; transformers 4.30.2 needs <1.0);
- 1.33.0 and 2.4.0: the current 1.x and 2.x (Python >= 3.10; 1.x uses httpx, 2.x httpx2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".venv-hub"
VERSIONS = ("0.17.3", "0.26.2", "0.36.2", "1.33.0", "2.4.0")


def folder(version: str) -> Path:
    return FOLDER / version


def installed(version: str) -> bool:
    return (folder(version) / "huggingface_hub" / "__init__.py").is_file()


def main() -> int:
    for version in VERSIONS:
        if installed(version):
            print(f"huggingface_hub {version}: already in {folder(version)}")
            continue
        print(f"huggingface_hub {version}: installing into {folder(version)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-warn-conflicts", "--target", str(folder(version)), f"huggingface_hub=={version}"],
                       check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
