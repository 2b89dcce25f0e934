// What the report's viewer (report.js) uses of three.js, exposed as the global THREE by
// build_viewer.sh; naming the parts lets esbuild drop the rest of the library.
export {
  AmbientLight, BufferAttribute, BufferGeometry, Color, DirectionalLight, DoubleSide, Mesh, MeshLambertMaterial,
  PerspectiveCamera, Scene, Vector3, WebGLRenderer,
} from "three";
export { OrbitControls } from "three/addons/controls/OrbitControls.js";
