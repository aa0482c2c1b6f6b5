"""The API's routes, one APIRouter per module, each over the shared ApiService (service.py)."""
