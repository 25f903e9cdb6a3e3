"""The registered model as code (MLflow's "models from code"): MLflow copies this file into each
logged model and runs it when the model is loaded, instead of unpickling a Python object.

It only names the pyfunc class (`ml.registry.pyfunc.PriceForecastModel`, from the model's own
code snapshot or the installed project); everything a model learned is in its artifacts. Models
logged before this file existed hold that class cloudpickled by reference (`python_model.pkl`)
and still load: the class and its artifacts' names are the same.
"""

import mlflow.models

from ml.registry.pyfunc import PriceForecastModel

mlflow.models.set_model(PriceForecastModel())
