"""lesionml: skin-lesion classification on HAM10000, as a library with no orchestration inside.

`tasks/` wraps these functions as Prefect tasks and `flows/` chains them; nothing here
imports either, so every function can be used and tested on its own.
"""

__version__ = "0.1.0"
