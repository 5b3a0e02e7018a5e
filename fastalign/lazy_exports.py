"""A package's public names, imported from their modules on first use (PEP 562 module __getattr__ and __dir__).

Importing fastalign or one of its engines then costs only what is used: an eager package imported every engine and
with them transformers, accelerate and torch._dynamo (6 s on a CPU), which a script that takes one op from it, or
`fastalign --help`, paid in full.

A package writes its public names as imports under `if TYPE_CHECKING:`, which type checkers and editors read (they
never run), and lists them in a literal `__all__`, as linters and type checkers expect; lazy_exports reads those
import statements from the package's source, so that each name is imported from the module they name when first
used, and refuses an `__all__` that lists other names.
"""
import ast
import importlib
import pkgutil


def type_checking_imports(source, path):
    """{public name: (module, name in the module)} of the `from MODULE import NAME [as PUBLIC]` statements inside
    the `if TYPE_CHECKING:` blocks at the top level of the Python `source` (of the file `path`, for errors)."""
    tree = ast.parse(source, filename=path)
    owners = {}
    for block in tree.body:
        if not (isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"):
            continue
        for statement in block.body:
            if not isinstance(statement, ast.ImportFrom) or statement.level:
                raise ImportError(f"{path}:{statement.lineno}: lazy_exports reads absolute `from MODULE import "
                                  "NAME` statements only in the TYPE_CHECKING block")
            for alias in statement.names:
                owners[alias.asname or alias.name] = (statement.module, alias.name)
    return owners


def subpackages(namespace):
    """The names of the public subpackages of the package whose globals() are `namespace`, imported or not."""
    return {module.name for module in pkgutil.iter_modules(namespace["__path__"])
            if module.ispkg and not module.name.startswith("_")}


def lazy_exports(namespace):
    """(__getattr__, __dir__) for the package whose globals() are `namespace`, exporting the names its source imports
    under `if TYPE_CHECKING:`, which must be those of its __all__. A public name is imported from its module on first
    access and kept in the package; another name that is a submodule is imported, as `import package.name` would;
    anything else is an AttributeError naming it."""
    package, path = namespace["__name__"], namespace["__file__"]
    source = namespace["__spec__"].loader.get_source(package)   # also from a zip archive on sys.path
    if source is None:
        raise ImportError(f"{path}: lazy_exports reads the package's source, which its loader does not have")
    owners = type_checking_imports(source, path)
    public = namespace.get("__all__", [])
    if not owners or set(public) != set(owners) or len(set(public)) != len(public):
        raise ImportError(f"{path}: __all__ must list each name of the `if TYPE_CHECKING:` imports once; "
                          f"imported, not listed: {sorted(set(owners) - set(public))}, listed, not imported: "
                          f"{sorted(set(public) - set(owners))}, listed twice: "
                          f"{sorted({n for n in public if public.count(n) > 1})}")

    def __getattr__(name):
        if name in owners:
            module, own_name = owners[name]
            value = namespace[name] = getattr(importlib.import_module(module), own_name)
            return value
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        # the subpackages too, which __getattr__ imports: tab completion offers fastalign.unlearn after
        # `import fastalign`, as README writes it
        return sorted(set(namespace) | set(owners) | subpackages(namespace))

    return __getattr__, __dir__
