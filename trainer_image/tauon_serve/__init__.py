"""tauon model server (python -m tauon_serve.serve): KServe V1/V2 and the OpenAI API."""
