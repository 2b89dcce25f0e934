"""The README's Python example: OFER from a script or a notebook in a few lines (CI runs it).

    python examples/python_api.py

Uses the bundled demo models and the synthetic FLAME-format model (made under data/synthetic/
on first use): the faces are synthetic, so this shows the API, not OFER's accuracy on real faces.
"""

import numpy as np

import ofer

model = ofer.load_demo(device="cpu")  # or ofer.load(idrank=..., idgen=..., expgen=..., cfg="configs/test_flame20.yml")
result = model.reconstruct_crop("data/synthetic/test/occluded_00.jpg", sampler="dpmpp_2m", steps=10,
                                exp_sampler="dpmpp_2m", exp_steps=10, seed=0)

print(f"neutral mesh {result.neutral_mesh.shape} mm, {len(result.expression_meshes)} expression samples, "
      f"{len(result.scores)} identity samples; IdRank picked #{result.best} (score {result.scores[result.best]:.3f})")
spread = np.linalg.norm(result.shape_meshes() - result.shape_meshes().mean(0), axis=-1).mean()
print(f"the identity samples lie {spread:.2f} mm from their mean on average")
marker = result.save("output/python_api")  # the files test.py writes for this image
print(f"wrote {len(marker['files'])} files to output/python_api/ (see {marker['files'][0]})")
