"""A package's public names, imported from their modules on first use (PEP 562 module __getattr__ and __dir__).

Importing fastalign or one of its engines then costs only what is used: an eager package imported every engine and
with them transformers, accelerate and torch._dynamo (6 s on a CPU), which a script that takes one op from it, or
`fastalign --help`, paid in full.
"""
import importlib


def lazy_exports(namespace, exports):
    """(__all__, __getattr__, __dir__) for the package whose globals() are `namespace`. `exports` maps a module to
    the names the package takes from it, each "name" or "name as public_name" as in an import. A public name is
    imported from its module on first access and kept in the package; another name that is a submodule is imported,
    as `import package.name` would; anything else is an AttributeError naming it."""
    package = namespace["__name__"]
    owners = {}
    for module, names in exports.items():
        for entry in names:
            name, _, public = entry.partition(" as ")
            owners[public or name] = (module, name)

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
        return sorted(set(namespace) | set(owners))

    return list(owners), __getattr__, __dir__
