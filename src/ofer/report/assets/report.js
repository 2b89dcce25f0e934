// The per-image 3D viewer of the OFER report (src/ofer/report). Classic script, no modules:
// pages open from file://, where module imports and fetch are blocked. Reads the globals set by
// viewer.min.js (THREE), run_data.js (OFER_RUN: faces, colour map, scale) and the page's
// <name>.data.js (OFER_IMAGE: meshes, spreads).
(function () {
  "use strict";

  function decode(base64, Type) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return new Type(bytes.buffer);
  }

  function decodeFaces(faces) {
    return decode(faces.data, faces.dtype === "uint16" ? Uint16Array : Uint32Array);
  }

  // sRGB 0-255 -> linear 0-1: three.js takes vertex colours as linear and encodes its output as sRGB.
  function linear(c) {
    const v = c / 255;
    return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  }

  // The colour map of ofer.inference.uncertainty.spread_colors: linear steps in sRGB, clipped to [0, scale].
  function spreadColours(spread, table, scale) {
    const out = new Float32Array(spread.length * 3);
    const steps = table.length - 1;
    for (let v = 0; v < spread.length; v++) {
      const value = Number.isFinite(spread[v]) ? spread[v] : 0;
      const position = Math.min(Math.max(value / scale, 0), 1) * steps;
      const low = Math.min(Math.floor(position), steps - 1);
      const w = position - low;
      for (let c = 0; c < 3; c++) {
        const srgb = Math.round((1 - w) * table[low][c] + w * table[low + 1][c]);
        out[3 * v + c] = linear(srgb);
      }
    }
    return out;
  }

  function message(text) {
    const box = document.getElementById("viewer-message");
    if (box) box.textContent = text;
  }

  function start() {
    const run = window.OFER_RUN, image = window.OFER_IMAGE;
    const canvas = document.getElementById("viewer");
    if (!canvas) return;
    if (typeof THREE === "undefined" || !run || !image) {
      message("The viewer's data or library did not load (assets/viewer.min.js, assets/run_data.js, this page's .data.js).");
      return;
    }
    if (!image.meshes.length) {
      message("No mesh of this image could be read: the viewer has nothing to show.");
      return;
    }
    const facesData = image.faces || run.faces;
    const index = decodeFaces(facesData);
    const meshes = image.meshes.map((m) => ({ label: m.label, positions: decode(m.positions, Float32Array) }));
    const plain = new Float32Array(meshes[0].positions.length).fill(linear(200));
    const colourings = { plain: plain };
    for (const key of ["shape", "expression"]) {
      if (image.spreads[key]) colourings[key] = spreadColours(decode(image.spreads[key], Float32Array), run.colormap, run.scale_mm);
    }

    let renderer;
    try {
      renderer = new THREE.WebGLRenderer({ canvas: canvas, antialias: true, preserveDrawingBuffer: true });
    } catch (err) {
      message("WebGL is not available in this browser: " + err.message);
      return;
    }
    renderer.setPixelRatio(window.devicePixelRatio || 1);
    renderer.setScissorTest(true);

    const geometry = new THREE.BufferGeometry();
    geometry.setIndex(new THREE.BufferAttribute(index, 1));
    geometry.setAttribute("position", new THREE.BufferAttribute(meshes[0].positions.slice(), 3));
    geometry.setAttribute("color", new THREE.BufferAttribute(plain.slice(), 3));
    geometry.computeVertexNormals();
    geometry.computeBoundingSphere();
    const material = new THREE.MeshLambertMaterial({ vertexColors: true, side: THREE.DoubleSide });
    const scene = new THREE.Scene();
    scene.background = new THREE.Color(0xf2f2f2);
    scene.add(new THREE.Mesh(geometry, material));
    scene.add(new THREE.AmbientLight(0xffffff, 0.9));

    // FLAME frame: y up, z out of the face, mm. Both cameras carry a headlight.
    const sphere = geometry.boundingSphere;
    const centre = sphere.center.clone(), distance = 4.4 * sphere.radius;
    const front = new THREE.PerspectiveCamera(30, 1, distance / 100, distance * 10);
    const side = front.clone();
    for (const camera of [front, side]) {
      const light = new THREE.DirectionalLight(0xffffff, 2.2);
      light.position.set(0.3, 0.4, 1);
      camera.add(light);
      scene.add(camera);
    }
    const controls = new THREE.OrbitControls(front, canvas);
    controls.target.copy(centre);
    function resetView() {
      front.position.set(centre.x, centre.y, centre.z + distance);
      front.up.set(0, 1, 0);
      controls.update();
    }

    const up = new THREE.Vector3(0, 1, 0);
    function draw() {
      const width = canvas.clientWidth, height = canvas.clientHeight;
      if (canvas.width !== Math.round(width * renderer.getPixelRatio())) renderer.setSize(width, height, false);
      const half = Math.floor(width / 2);
      // The side view: the front camera turned 90 degrees about the vertical through the target.
      side.position.copy(front.position).sub(controls.target).applyAxisAngle(up, Math.PI / 2).add(controls.target);
      side.up.copy(front.up);
      side.lookAt(controls.target);
      for (const [camera, left] of [[front, 0], [side, half]]) {
        camera.aspect = half / height;
        camera.updateProjectionMatrix();
        renderer.setViewport(left, 0, half, height);
        renderer.setScissor(left, 0, half, height);
        renderer.render(scene, camera);
      }
    }
    controls.addEventListener("change", draw);
    window.addEventListener("resize", draw);

    const slider = document.getElementById("mesh");
    const label = document.getElementById("mesh-label");
    function showMesh(k) {
      geometry.attributes.position.array.set(meshes[k].positions);
      geometry.attributes.position.needsUpdate = true;
      geometry.computeVertexNormals();
      label.textContent = meshes[k].label + " (" + (k + 1) + " of " + meshes.length + ")";
      draw();
    }
    slider.max = String(meshes.length - 1);
    slider.value = "0";
    slider.addEventListener("input", () => showMesh(Number(slider.value)));
    for (const [id, step] of [["previous", -1], ["next", 1]]) {
      document.getElementById(id).addEventListener("click", () => {
        slider.value = String((Number(slider.value) + step + meshes.length) % meshes.length);
        showMesh(Number(slider.value));
      });
    }
    for (const input of document.querySelectorAll("input[name=colouring]")) {
      input.disabled = !(input.value in colourings);
      input.addEventListener("change", () => {
        geometry.attributes.color.array.set(colourings[input.value]);
        geometry.attributes.color.needsUpdate = true;
        document.getElementById("legend").hidden = input.value === "plain";
        draw();
      });
    }
    document.getElementById("reset").addEventListener("click", () => { resetView(); draw(); });
    resetView();
    showMesh(0);
    canvas.dataset.drawn = "true";  // read by tests/test_report_browser.py
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
