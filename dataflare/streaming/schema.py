"""The JSON Schema of pipeline files, for editors that check files as people type.

`pipeline_json_schema()` returns a JSON Schema (draft 2020-12) built from
the pydantic models of the file format, with the `config` of each step
checked against its plugin's config model: for every registered type, an
`if: {type: const NAME}` / `then: {config: ...}` pair. The schema also
accepts a template file (`parameters` and `template`); the template body
is not checked, since its values are Jinja2 text until rendered.

For example, with the YAML language server in VS Code, save the schema to a
file and start a pipeline file with::

    # yaml-language-server: $schema=dataflare-pipeline.schema.json

The schema finds problems of one file on its own. The checks that need the
data or the whole graph (fields, inputs naming steps, cycles) are done by
`dataflare.streaming.validate`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import BaseModel
from pydantic.errors import PydanticUserError

from dataflare.plugin.registry import PluginRegistry, default_registry
from dataflare.streaming.loader import PARAMETER_TYPES
from dataflare.streaming.spec import PipelineSpec

logger = logging.getLogger(__name__)

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_STEP_DEFINITIONS = {
    "sources": "SourceSpec",
    "transformations": "TransformSpec",
    "destinations": "DestinationSpec",
}


def pipeline_json_schema(registry: PluginRegistry | None = None) -> dict[str, Any]:
    """Return the JSON Schema of pipeline files for the plugins in `registry`.

    Args:
        registry: where step types are found; the installed plugins if None.
            A plugin that cannot be imported is left out (and logged), so a
            file using it does not pass the schema.
    """
    registry = registry or default_registry()
    pipeline = PipelineSpec.model_json_schema()
    definitions: dict[str, Any] = pipeline.pop("$defs", {})
    for section, definition in _STEP_DEFINITIONS.items():
        rules, names = _config_rules(section, registry, definitions)
        step = definitions[definition]
        step["properties"]["type"] = {
            "description": f"Plugin type of this step; one of the installed {section}",
            "enum": names,
        }
        if rules:
            step["allOf"] = rules
    definitions["Pipeline"] = pipeline
    definitions["Template"] = _template_schema()
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "DataFlare pipeline",
        "description": "A DataFlare pipeline file, or a template that renders to one",
        # A file with a `template` key is a template; anything else a pipeline.
        "if": {"type": "object", "required": ["template"]},
        "then": {"$ref": "#/$defs/Template"},
        "else": {"$ref": "#/$defs/Pipeline"},
        "$defs": definitions,
    }


def _config_rules(
    section: str, registry: PluginRegistry, definitions: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Return the `if`/`then` rule of each type of `section`, and the type names."""
    rules = []
    names = []
    for name in registry.names(section):
        try:
            cls = registry.get(section, name)
        except (ImportError, TypeError, AttributeError, LookupError) as exc:
            logger.warning("plugin %r left out of the JSON Schema: %s", name, exc)
            continue
        names.append(name)
        prefix = f"{section}.{name}."
        config = config_json_schema(cls.Config, prefix)
        for key, value in config.pop("$defs", {}).items():
            definitions[prefix + key] = value
        rules.append(
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {"properties": {"config": config}},
            }
        )
    return rules, names


def config_json_schema(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Return the JSON Schema of a plugin config model.

    Nested definitions are named `prefix + model name`, so that the configs
    of several plugins can share one `$defs`. A model with a field that has
    no JSON form (an in-memory Arrow table) gets a schema that accepts any
    mapping.
    """
    try:
        return model.model_json_schema(ref_template=f"#/$defs/{prefix}{{model}}")
    except PydanticUserError as exc:  # a field type without a JSON Schema
        logger.info("config of %s has no JSON Schema: %s", model.__name__, exc)
        return {"type": "object", "title": model.__name__}


def _template_schema() -> dict[str, Any]:
    parameter = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "type": {"enum": list(PARAMETER_TYPES), "default": "string"},
            "default": {"description": "Value used when none is given"},
            "description": {"type": "string"},
            "choices": {"type": "array", "description": "The allowed values"},
        },
    }
    return {
        "type": "object",
        "title": "Template",
        "description": "Parameters, and a pipeline whose strings are Jinja2 templates",
        "additionalProperties": False,
        "required": ["template"],
        "properties": {
            "parameters": {
                "type": "object",
                "additionalProperties": copy.deepcopy(parameter),
            },
            "template": {"type": "object"},
        },
    }
