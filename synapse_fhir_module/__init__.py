"""synapse-fhir-module: care-team rooms on Matrix, backed by FHIR."""

from synapse_fhir_module.module import FhirModule

__all__ = ["FhirModule"]
__version__ = "0.1.0"
