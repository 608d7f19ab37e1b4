# `python -m onnxpipe`: signals and closed std streams are handled before anything is imported.
from onnxpipe import signals

signals.install()

from onnxpipe.main import main  # noqa: E402

main()
