"""pgttt: an evaluation server for OpenAI's Parameter Golf, with score-first test-time training.

The package is laid out by concern: ``pgttt.checkpoints`` (what a saved model is),
``pgttt.ttt`` (the evaluation engine), ``pgttt.app`` (the HTTP service), ``pgttt.training``
(the job that writes ``model.bin``), and this package's ``main`` (the ``pgttt`` command).
"""

__version__ = "0.1.0"
