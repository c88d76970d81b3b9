"""nanokv.serve: an HTTP server with the OpenAI API over one engine.

    pip install 'nanokv[serve]'
    python -m nanokv.serve --model smollm2-135m --method snapkv --compression 0.5

engine_loop.py steps the engine in a background thread, app.py holds the routes, protocol.py the
request and response shapes, metrics.py /metrics, cli.py the command line.
"""
