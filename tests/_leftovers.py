"""What a sandboxed run may have left in the host's temporary directory, found by a tag the run
put in every name it wrote. Other sessions on a shared machine make and remove their own files
there meanwhile, so only names holding the tag count."""

import os
import tempfile


def tagged_leftovers(tag: str, depth: int = 4) -> list[str]:
    """Paths under the temporary directory, `depth` levels down, whose names hold `tag`."""
    found = []
    top = tempfile.gettempdir()
    for root, dirs, files in os.walk(top, onerror=lambda e: None):
        if root[len(top):].count(os.sep) >= depth:
            dirs[:] = []
        found += [os.path.join(root, name) for name in dirs + files if tag in name]
    return found
