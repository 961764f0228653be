"""The HTTP API's OpenAPI 3.0 document, generated from the proto's descriptors: protos/ stays the one contract."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from lookalike.v1 import lookalike_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ImageSimilarity"]
CONSOLE_DIR = Path(__file__).resolve().parent / "console"
_CONSOLE_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html"}
# Each RPC's HTTP route; GetInfo takes no body and is a GET.
ROUTES = {"Embed": "/v1/embed", "FindSimilar": "/v1/similar", "Recommend": "/v1/recommend", "GetInfo": "/v1/info"}
_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    # The canonical JSON mapping writes 64-bit integers as strings.
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
}
_ERROR = {"type": "object", "required": ["code", "message"], "properties": {
    "code": {"type": "string", "description": "the gRPC status code's name, e.g. INVALID_ARGUMENT"},
    "message": {"type": "string"}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _field_schema(field: FieldDescriptor) -> dict:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        schema = _ref(field.message_type.name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        schema = {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    else:
        schema = dict(_SCALARS.get(field.type, {"type": "string"}))
    return schema


def _message_schema(message: Descriptor) -> dict:
    properties = {}
    for field in message.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema = {"type": "object", "additionalProperties": _field_schema(value)}
        elif field.is_repeated:
            schema = {"type": "array", "items": _field_schema(field)}
        else:
            schema = _field_schema(field)
        if field.GetOptions().deprecated:
            schema = {**schema, "deprecated": True} if "$ref" not in schema else {"allOf": [schema], "deprecated": True}
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            description = f"one of the oneof `{oneof.name}`: {', '.join(f.json_name for f in oneof.fields)}"
            schema = {**schema, "description": description} if "$ref" not in schema else \
                {"allOf": [schema], "description": description}
        properties[field.json_name] = schema
    return {"type": "object", "properties": properties}


def openapi_document() -> dict:
    """Every message of the proto as a schema (field names as the JSON mapping writes them), every route."""
    schemas = {name: _message_schema(message) for name, message in pb.DESCRIPTOR.message_types_by_name.items()}
    schemas["Error"] = _ERROR
    errors = {"default": {"description": "an error: HTTP status as grpc-gateway maps the gRPC code",
                          "content": {"application/json": {"schema": _ref("Error")}}}}
    paths: dict[str, dict] = {}
    for method in SERVICE.methods:
        operation = {
            "operationId": method.name, "tags": [SERVICE.name],
            "summary": f"{SERVICE.full_name}.{method.name} in protobuf's canonical JSON mapping",
            "parameters": [{"name": "grpc-timeout", "in": "header", "required": False,
                            "description": "the call's deadline as gRPC writes it, e.g. 500m or 2S",
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": method.output_type.name,
                                  "content": {"application/json": {"schema": _ref(method.output_type.name)}}},
                          **errors}}
        if method.name == "GetInfo":
            paths[ROUTES[method.name]] = {"get": operation}
        else:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _ref(method.input_type.name)}}}
            paths[ROUTES[method.name]] = {"post": operation}
    text = {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}
    paths["/healthz"] = {"get": {"operationId": "Liveness", "summary": "the process answers", "responses": text}}
    paths["/readyz"] = {"get": {"operationId": "Readiness", "summary": "a version is loaded and warm (503 before)",
                                "responses": {**text, "503": {"description": "not serving yet, or draining"}}}}
    paths["/v1/attributes"] = {"get": {"operationId": "Attributes",
                                       "summary": "each string attribute key's values and each number key's "
                                                  "bounds in the served version",
                                       "responses": {**text, **errors}}}
    paths["/v1/images/{image_id}"] = {"get": {
        "operationId": "Image", "summary": "a catalogue image of the served version, by image id",
        "parameters": [{"name": "image_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the image file", "content": {"image/*": {"schema": {
            "type": "string", "format": "binary"}}}}, **errors}}}
    paths["/v1/products/{product_id}/images"] = {"get": {
        "operationId": "ProductImages", "summary": "a served product's image ids and roles, main first (at most 100; "
                                                   "imageCount says how many it has)",
        "parameters": [{"name": "product_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {**text, **errors}}}
    paths["/openapi.json"] = {"get": {"operationId": "OpenApi", "summary": "this document", "responses": text}}
    paths["/"] = {"get": {"operationId": "Console", "summary": "the console (HTML)",
                          "responses": {"200": {"description": "the console", "content": {"text/html": {}}}}}}
    files = sorted(path.name for path in CONSOLE_DIR.iterdir() if path.suffix in _CONSOLE_TYPES)
    paths["/console/{file}"] = {"get": {
        "operationId": "ConsoleFile", "summary": "the console's page, style sheet and script (static files)",
        "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string", "enum": files}}],
        "responses": {"200": {"description": "the file", "content": {
            content_type: {} for content_type in sorted({_CONSOLE_TYPES[Path(f).suffix] for f in files})}},
            "404": {"description": "no such file"}}}}
    return {"openapi": "3.0.3",
            "info": {"title": "lookalike", "version": "v1",
                     "description": f"{SERVICE.full_name} over HTTP/JSON, generated from {pb.DESCRIPTOR.name}"},
            "paths": paths, "components": {"schemas": schemas}}
