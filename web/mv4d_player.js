// mv4d's 4D Gaussian player: WebGL2 splatting of dynamic Gaussians, depth-sorted in a Web Worker.
//
// It plays `.mv4dweb` files (layout: kernels/splats/player_file.py), which hold the dynamic Gaussians with
// their motion model unchanged, and draws them by the rules of our reference rasteriser,
// kernels/splats/rasterize.py `render` (gsplat's "classic" mode), so a view of the player matches the torch
// image of the same camera and time:
//   - cameras are OpenCV world-to-camera [R | t] with pixel intrinsics fx, fy, cx, cy; the pixel in column i,
//     row j (from the top) has its centre at (i + 0.5, j + 0.5), which is gl_FragCoord (x, height - y);
//   - each Gaussian at time t: position = mean + sum basis_k(t) motion_k, rotation = normalise(quat + ...),
//     opacity = sigmoid(logit) * temporal window (kernels/splats/model.py), colour from spherical harmonics of
//     the direction from the camera centre, + 0.5, clamped at 0;
//   - EWA projection with gsplat's clamped Jacobian, 0.3 px^2 of blur, an opacity-aware 3.33-sigma box, alpha
//     capped at 0.999, fragments under 1/255 dropped; Gaussians nearer than 0.01 culled;
//   - blending back to front over the background, sorted by camera depth (z) of the centres.
// The vertex shader evaluates the motion of every Gaussian on the GPU; the worker evaluates only what sorting
// needs (depth and opacity at time t) and returns the draw order. The render loop never waits for a sort: it
// draws with the latest order it has.
//
// Budgets for large scenes: `maxGaussians` (drawn at most: the largest and most opaque Gaussians visible at
// the time; default all) and `sortIntervalMs` (the least time between two sorts; default 0, as fast as the
// worker sorts). Both are in the player's controls.
//
// No dependencies, no network access of its own: `load(url)` fetches the one URL it is given, and the worker
// runs from a Blob, so the player works inside ComfyUI (any api base), offline, and from a file:// page.

export const FILE_SUFFIX = ".mv4dweb";
const MAGIC = "MV4D-WEB";
const VERSION = 1;
const PREAMBLE_BYTES = 16;
const BUDGETS = [0, 1_000_000, 500_000, 250_000, 100_000]; // 0 = every Gaussian
const SORT_INTERVALS = [0, 100, 250];

export class PlayerFileError extends Error {}

function describeForeign(bytes) {
    const text = String.fromCharCode(...bytes.slice(0, 16)).replace(/[^\x20-\x7e]/g, ".");
    const word = bytes.length >= 4 ? new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, true) : -1;
    if (word === 0x674b) return "a .splatv file (splaTV)";
    if (bytes[0] === 0x89 && text.startsWith(".PNG")) return "a PNG image";
    if (bytes[0] === 0xff && bytes[1] === 0xd8) return "a JPEG image";
    if (text.startsWith("ply")) return "a .ply file";
    if (/^\s*[<{[]/.test(text)) return "a text file";
    return `a file starting with "${text}"`;
}

// Header and payload of a .mv4dweb file, or a PlayerFileError saying what is wrong in words a user can act on.
export function parsePlayerFile(buffer) {
    const bytes = new Uint8Array(buffer);
    const rewrite = "Run the workflow again to write it anew.";
    if (bytes.length < PREAMBLE_BYTES || String.fromCharCode(...bytes.slice(0, 8)) !== MAGIC) {
        if (bytes.length === 0) throw new PlayerFileError(`The file is empty. ${rewrite}`);
        throw new PlayerFileError(`This is not an mv4d player file: it is ${describeForeign(bytes)}. MV4D Preview 4D plays ` +
            `the ${FILE_SUFFIX} files it writes; to look at a .splatv or .mv4d.safetensors, connect MV4D Load 4D to MV4D Preview 4D.`);
    }
    const view = new DataView(buffer, 0, PREAMBLE_BYTES);
    const version = view.getUint32(8, true);
    const headerBytes = view.getUint32(12, true);
    if (version !== VERSION) {
        throw new PlayerFileError(`The file has format version ${version}; this player reads version ${VERSION}. Update mv4d.`);
    }
    if (PREAMBLE_BYTES + headerBytes > bytes.length || headerBytes % 4) {
        throw new PlayerFileError(`The file is truncated: ${bytes.length} bytes, and its header alone needs ` +
            `${PREAMBLE_BYTES + headerBytes}. ${rewrite}`);
    }
    let header;
    try {
        header = JSON.parse(new TextDecoder().decode(bytes.subarray(PREAMBLE_BYTES, PREAMBLE_BYTES + headerBytes)));
    } catch (error) {
        throw new PlayerFileError(`The file's header is damaged (${error.message}). ${rewrite}`);
    }
    const { count, stride, fields } = header;
    if (!Number.isInteger(count) || count < 0 || !Number.isInteger(stride) || stride <= 0 || stride % 4 || !fields?.means) {
        throw new PlayerFileError(`The file's header is damaged (count ${count}, stride ${stride}). ${rewrite}`);
    }
    const needed = PREAMBLE_BYTES + headerBytes + count * stride * 4;
    if (bytes.length < needed) {
        const whole = Math.floor((bytes.length - PREAMBLE_BYTES - headerBytes) / (stride * 4));
        throw new PlayerFileError(`The file is truncated: ${bytes.length} of ${needed} bytes, ${whole} of ${count} Gaussians. ${rewrite}`);
    }
    if (count === 0) throw new PlayerFileError("The scene holds no Gaussians: there is nothing to show.");
    const words = new Uint32Array(buffer, PREAMBLE_BYTES + headerBytes, count * stride);
    return { header, words };
}

// The motion basis at time t, as kernels/splats/model.py time_basis: position (tau^1..tau^P, then sin, cos of
// 2 pi k t for k = 1..K), rotation (tau^1..tau^R), tau = 2t - 1.
export function timeBasis(motion, t) {
    const tau = 2 * t - 1;
    const position = [];
    for (let k = 1; k <= motion.position_degree; k++) position.push(tau ** k);
    for (let k = 1; k <= motion.fourier_terms; k++) {
        position.push(Math.sin(2 * Math.PI * k * t), Math.cos(2 * Math.PI * k * t));
    }
    const rotation = [];
    for (let k = 1; k <= motion.rotation_degree; k++) rotation.push(tau ** k);
    return { position: new Float32Array(position), rotation: new Float32Array(rotation) };
}

// -- shaders ---------------------------------------------------------------------------------------------------

function vertexShader(header, textureWidth) {
    const { motion, fields } = header;
    const positionTerms = motion.position_degree + 2 * motion.fourier_terms;
    const offset = (name) => `${fields[name]?.offset ?? 0}u`;
    return `#version 300 es
precision highp float;
precision highp int;
precision highp usampler2D;
#define STRIDE_TEXELS ${header.stride / 4}u
#define TEXTURE_WIDTH ${textureWidth}u
#define POSITION_TERMS ${positionTerms}
#define ROTATION_TERMS ${motion.rotation_degree}
#define SH_DEGREE ${motion.sh_degree}
#define TEMPORAL ${motion.temporal_opacity ? 1 : 0}

uniform usampler2D u_data;        // the file's records, stride / 4 RGBA32UI texels each
uniform mat3 u_rotation;          // world-to-camera rotation (OpenCV)
uniform vec3 u_translation;
uniform vec3 u_eye;               // camera centre in world coordinates
uniform vec4 u_intrinsics;        // fx, fy, cx, cy in pixels
uniform vec2 u_viewport;          // width, height in pixels
uniform float u_time;
uniform float u_position_basis[${Math.max(positionTerms, 1)}];
uniform float u_rotation_basis[${Math.max(motion.rotation_degree, 1)}];

in uint a_index;                  // which Gaussian (instanced, in back-to-front order)

flat out vec4 v_colour;           // rgb, opacity at u_time
flat out vec3 v_conic;            // inverse 2D covariance (a, b, c)
flat out vec2 v_mean;             // projected centre in pixels, y down

uint word(uint base, uint w) {
    uint texel = base + (w >> 2u);
    uvec4 value = texelFetch(u_data, ivec2(int(texel % TEXTURE_WIDTH), int(texel / TEXTURE_WIDTH)), 0);
    uint lane = w & 3u;
    return lane == 0u ? value.x : lane == 1u ? value.y : lane == 2u ? value.z : value.w;
}
float f32(uint base, uint w) { return uintBitsToFloat(word(base, w)); }
float f16(uint base, uint field, uint i) {
    vec2 pair = unpackHalf2x16(word(base, field + (i >> 1u)));
    return (i & 1u) == 0u ? pair.x : pair.y;
}
vec3 f16x3(uint base, uint field, uint i) { return vec3(f16(base, field, i), f16(base, field, i + 1u), f16(base, field, i + 2u)); }
void cull() { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); }  // outside the clip volume: nothing is drawn

void main() {
    uint base = a_index * STRIDE_TEXELS;
    vec3 position = vec3(f32(base, ${offset("means")}), f32(base, ${offset("means")} + 1u), f32(base, ${offset("means")} + 2u));
#if POSITION_TERMS > 0
    for (int k = 0; k < POSITION_TERMS; k++) position += u_position_basis[k] * f16x3(base, ${offset("position_motion")}, uint(3 * k));
#endif
    float opacity = 1.0 / (1.0 + exp(-f16(base, ${offset("opacity")}, 0u)));
#if TEMPORAL
    float from_centre = (u_time - f16(base, ${offset("opacity")}, 1u)) / exp(f16(base, ${offset("opacity")}, 2u));
    opacity *= exp(-0.5 * from_centre * from_centre);
#endif
    vec3 camera = u_rotation * position + u_translation;
    if (opacity < 1.0 / 255.0 || camera.z <= 0.01 || camera.z >= 1e10) { cull(); return; }

    vec4 q = vec4(f16(base, ${offset("quats")}, 0u), f16(base, ${offset("quats")}, 1u), f16(base, ${offset("quats")}, 2u), f16(base, ${offset("quats")}, 3u));
#if ROTATION_TERMS > 0
    for (int k = 0; k < ROTATION_TERMS; k++) {
        uint i = uint(4 * k);
        q += u_rotation_basis[k] * vec4(f16(base, ${offset("rotation_motion")}, i), f16(base, ${offset("rotation_motion")}, i + 1u),
                                        f16(base, ${offset("rotation_motion")}, i + 2u), f16(base, ${offset("rotation_motion")}, i + 3u));
    }
#endif
    q /= max(length(q), 1e-12);
    float w = q.x, x = q.y, y = q.z, z = q.w;
    mat3 rotation = mat3(  // columns of the rotation matrix of the unit quaternion wxyz
        1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y + w * z), 2.0 * (x * z - w * y),
        2.0 * (x * y - w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z + w * x),
        2.0 * (x * z + w * y), 2.0 * (y * z - w * x), 1.0 - 2.0 * (x * x + y * y));
    vec3 scale = exp(f16x3(base, ${offset("log_scales")}, 0u));
    mat3 m = rotation * mat3(scale.x, 0.0, 0.0, 0.0, scale.y, 0.0, 0.0, 0.0, scale.z);
    mat3 covariance = u_rotation * (m * transpose(m)) * transpose(u_rotation);

    // EWA splatting with gsplat's Jacobian: the centre's direction clamped to 1.3 x the field of view
    float fx = u_intrinsics.x, fy = u_intrinsics.y, cx = u_intrinsics.z, cy = u_intrinsics.w;
    vec2 tan_fov = 0.5 * u_viewport / vec2(fx, fy);
    float tx = camera.z * clamp(camera.x / camera.z, -(cx / fx + 0.3 * tan_fov.x), (u_viewport.x - cx) / fx + 0.3 * tan_fov.x);
    float ty = camera.z * clamp(camera.y / camera.z, -(cy / fy + 0.3 * tan_fov.y), (u_viewport.y - cy) / fy + 0.3 * tan_fov.y);
    float z2 = camera.z * camera.z;
    mat3 jacobian = mat3(fx / camera.z, 0.0, 0.0, 0.0, fy / camera.z, 0.0, -fx * tx / z2, -fy * ty / z2, 0.0);
    mat3 projected = jacobian * covariance * transpose(jacobian);
    float a = projected[0][0] + 0.3, b = projected[1][0], c = projected[1][1] + 0.3;
    float det = a * c - b * b;
    if (det <= 0.0) { cull(); return; }
    vec2 mean = vec2(fx * camera.x / camera.z + cx, fy * camera.y / camera.z + cy);
    float extend = min(3.33, sqrt(2.0 * log(opacity * 255.0)));
    vec2 radius = ceil(extend * sqrt(max(vec2(a, c), 0.0)));
    if (radius.x <= 0.0 || radius.y <= 0.0) { cull(); return; }

    vec3 d = normalize(position - u_eye);
    vec3 colour = 0.28209479177387814 * f16x3(base, ${offset("sh")}, 0u);
#if SH_DEGREE > 0
    colour += -0.48860251190292 * d.y * f16x3(base, ${offset("sh")}, 3u) + 0.48860251190292 * d.z * f16x3(base, ${offset("sh")}, 6u)
              - 0.48860251190292 * d.x * f16x3(base, ${offset("sh")}, 9u);
#endif
#if SH_DEGREE > 1
    float xx = d.x * d.x, yy = d.y * d.y, zz = d.z * d.z;
    colour += 1.092548430592079 * d.x * d.y * f16x3(base, ${offset("sh")}, 12u) - 1.092548430592079 * d.y * d.z * f16x3(base, ${offset("sh")}, 15u)
              + (0.9461746957575601 * zz - 0.3153915652525201) * f16x3(base, ${offset("sh")}, 18u)
              - 1.092548430592079 * d.x * d.z * f16x3(base, ${offset("sh")}, 21u) + 0.5462742152960395 * (xx - yy) * f16x3(base, ${offset("sh")}, 24u);
#endif
#if SH_DEGREE > 2
    float c1 = xx - yy, s1 = 2.0 * d.x * d.y, c2 = d.x * c1 - d.y * s1, s2 = d.x * s1 + d.y * c1;
    float tc = -2.285228997322329 * zz + 0.4570457994644658;
    colour += -0.5900435899266435 * s2 * f16x3(base, ${offset("sh")}, 27u) + 1.445305721320277 * d.z * s1 * f16x3(base, ${offset("sh")}, 30u)
              + tc * d.y * f16x3(base, ${offset("sh")}, 33u) + d.z * (1.865881662950577 * zz - 1.119528997770346) * f16x3(base, ${offset("sh")}, 36u)
              + tc * d.x * f16x3(base, ${offset("sh")}, 39u) + 1.445305721320277 * d.z * c1 * f16x3(base, ${offset("sh")}, 42u)
              - 0.5900435899266435 * c2 * f16x3(base, ${offset("sh")}, 45u);
#endif
    v_colour = vec4(max(colour + 0.5, 0.0), opacity);
    v_conic = vec3(c, -b, a) / det;
    v_mean = mean;
    vec2 corner = vec2(float(gl_VertexID & 1), float(gl_VertexID >> 1)) * 2.0 - 1.0;  // triangle strip of one quad
    vec2 pixel = mean + corner * radius;
    gl_Position = vec4(pixel.x / u_viewport.x * 2.0 - 1.0, 1.0 - pixel.y / u_viewport.y * 2.0, 0.0, 1.0);
}`;
}

const FRAGMENT_SHADER = `#version 300 es
precision highp float;
uniform vec2 u_viewport;
flat in vec4 v_colour;
flat in vec3 v_conic;
flat in vec2 v_mean;
out vec4 colour;
void main() {
    vec2 d = v_mean - vec2(gl_FragCoord.x, u_viewport.y - gl_FragCoord.y);  // pixel centres, y down
    float sigma = 0.5 * (v_conic.x * d.x * d.x + v_conic.z * d.y * d.y) + v_conic.y * d.x * d.y;
    float alpha = min(0.999, v_colour.a * exp(-sigma));
    if (sigma < 0.0 || alpha < 1.0 / 255.0) discard;
    colour = vec4(min(v_colour.rgb, vec3(1.0)) * alpha, alpha);  // premultiplied: ONE, ONE_MINUS_SRC_ALPHA
}`;

// -- the sort worker (its source becomes a Blob: no URL to fetch, so it runs under any origin) ---------------

function sortWorkerMain() {
    const MIN_DEPTH = 0.01;
    const MIN_OPACITY = 1 / 255;
    let scene = null;

    function halfTable() {
        const table = new Float32Array(65536);
        for (let h = 0; h < 65536; h++) {
            const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 31, fraction = h & 1023;
            table[h] = exponent === 0 ? sign * fraction * 2 ** -24
                : exponent === 31 ? (fraction ? NaN : sign * Infinity) : sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
        }
        return table;
    }

    // Everything sorting needs, stored in the order of importance (opacity x area, largest first), so that a
    // budget keeps the most important Gaussians and each sort reads its arrays front to back.
    function prepare({ words, stride, fields, positionTerms, temporal }) {
        const half = halfTable();
        const count = words.length / stride;
        const halfAt = (record, field, i) => {
            const word = words[record * stride + field.offset + (i >> 1)];
            return half[i & 1 ? word >>> 16 : word & 0xffff];
        };
        const floats = new Float32Array(words.buffer, words.byteOffset, words.length);
        const importance = new Float32Array(count);
        for (let n = 0; n < count; n++) {
            const logScales = halfAt(n, fields.log_scales, 0) + halfAt(n, fields.log_scales, 1) + halfAt(n, fields.log_scales, 2);
            importance[n] = Math.exp((2 / 3) * logScales) / (1 + Math.exp(-halfAt(n, fields.opacity, 0)));
        }
        const rank = new Uint32Array(count).map((_, n) => n).sort((a, b) => importance[b] - importance[a]);
        const terms = positionTerms;
        const means = new Float32Array(3 * count), motion = new Float32Array(3 * terms * count);
        const opacity = new Float32Array(count), centre = new Float32Array(count), inverseWidth = new Float32Array(count);
        for (let i = 0; i < count; i++) {
            const n = rank[i];
            for (let c = 0; c < 3; c++) means[3 * i + c] = floats[n * stride + fields.means.offset + c];
            for (let j = 0; j < 3 * terms; j++) motion[3 * terms * i + j] = halfAt(n, fields.position_motion, j);
            opacity[i] = 1 / (1 + Math.exp(-halfAt(n, fields.opacity, 0)));
            if (temporal) {
                centre[i] = halfAt(n, fields.opacity, 1);
                inverseWidth[i] = Math.exp(-halfAt(n, fields.opacity, 2));
            }
        }
        const depths = new Float32Array(count);
        return {
            count, terms, temporal, rank, means, motion, opacity, centre, inverseWidth,
            depths, keys: new Uint32Array(depths.buffer), ids: new Uint32Array(count),
            spareKeys: new Uint32Array(count), spareIds: new Uint32Array(count), counts: new Uint32Array(65536),
        };
    }

    // ids of the Gaussians in front of the camera and visible at the time, far to near: an LSD radix sort on
    // the float bits of the depth (positive floats order as their bits), two passes of 16 bits. With a budget,
    // the first `budget` such Gaussians in order of importance (complete: false when the budget cut the list).
    function sort({ id, row, basis, time, budget }) {
        const started = performance.now();
        const s = scene;
        const [r0, r1, r2, tz] = row;
        const terms = s.terms, means = s.means, motion = s.motion;
        // the depth of each motion term along the camera's axis: depth = r . mean + sum_k basis_k (r . motion_k)
        let drawn = 0, i = 0;
        const limit = budget ? Math.min(budget, s.count) : s.count;
        for (; i < s.count && drawn < limit; i++) {
            let opacity = s.opacity[i];
            if (s.temporal) {
                const offset = (time - s.centre[i]) * s.inverseWidth[i];
                opacity *= Math.exp(-0.5 * offset * offset);
            }
            if (opacity < MIN_OPACITY) continue;
            let depth = r0 * means[3 * i] + r1 * means[3 * i + 1] + r2 * means[3 * i + 2] + tz;
            for (let k = 0, m = 3 * terms * i; k < terms; k++, m += 3) {
                depth += basis[k] * (r0 * motion[m] + r1 * motion[m + 1] + r2 * motion[m + 2]);
            }
            if (!(depth > MIN_DEPTH)) continue;
            s.depths[drawn] = depth;
            s.ids[drawn++] = s.rank[i];
        }
        const complete = i >= s.count;
        let keys = s.keys, ids = s.ids, spareKeys = s.spareKeys, spareIds = s.spareIds;
        for (let j = 0; j < drawn; j++) keys[j] = ~keys[j] >>> 0;  // descending depth
        for (let shift = 0; shift < 32; shift += 16) {
            const counts = s.counts.fill(0);
            for (let j = 0; j < drawn; j++) counts[(keys[j] >>> shift) & 0xffff]++;
            for (let b = 0, sum = 0; b < 65536; b++) { const c = counts[b]; counts[b] = sum; sum += c; }
            for (let j = 0; j < drawn; j++) {
                const slot = counts[(keys[j] >>> shift) & 0xffff]++;
                spareKeys[slot] = keys[j];
                spareIds[slot] = ids[j];
            }
            [keys, spareKeys] = [spareKeys, keys];
            [ids, spareIds] = [spareIds, ids];
        }
        const order = ids.slice(0, drawn);  // two passes: the result is back in s.ids
        return { type: "order", id, order, drawn, complete, ms: performance.now() - started };
    }

    self.onmessage = ({ data }) => {
        try {
            if (data.type === "scene") {
                scene = prepare(data);
                self.postMessage({ type: "ready", count: scene.count });
            } else if (data.type === "sort" && scene) {
                const result = sort(data);
                self.postMessage(result, [result.order.buffer]);
            }
        } catch (error) {
            self.postMessage({ type: "error", message: String(error && error.message || error) });
        }
    };
}

function startSortWorker() {
    const source = `(${sortWorkerMain.toString()})();`;
    const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
    try {
        return new Worker(url);
    } finally {
        URL.revokeObjectURL(url);
    }
}

// -- small vector helpers (3-vectors as arrays) ----------------------------------------------------------------

const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const add = (a, b, s = 1) => [a[0] + s * b[0], a[1] + s * b[1], a[2] + s * b[2]];
const scale = (a, s) => [a[0] * s, a[1] * s, a[2] * s];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const normalise = (a) => scale(a, 1 / Math.max(Math.hypot(...a), 1e-12));

function rotateAbout(v, axis, angle) {  // Rodrigues' rotation of v about a unit axis
    const c = Math.cos(angle), s = Math.sin(angle);
    return add(add(scale(v, c), cross(axis, v), s), axis, dot(axis, v) * (1 - c));
}

// The viewer's camera: an OpenCV camera (rows right, down, forward of the rotation) orbiting a target point.
class OrbitCamera {
    constructor(view) {
        this.up = normalise(view.up ?? [0, 0, 1]);
        this.radius = view.radius ?? 1;
        this.center = view.center ?? [0, 0, 0];
    }

    // Look exactly as an OpenCV world-to-camera matrix (16 numbers, row-major) does; orbit about the point
    // ahead of it nearest to the scene centre.
    setFromMatrix(m) {
        this.axes = [[m[0], m[1], m[2]], [m[4], m[5], m[6]], [m[8], m[9], m[10]]];
        const t = [m[3], m[7], m[11]];
        this.eye = scale(add(add(scale(this.axes[0], t[0]), this.axes[1], t[1]), this.axes[2], t[2]), -1);  // -R^T t
        this.distance = Math.max(dot(add(this.center, this.eye, -1), this.axes[2]), 0.1 * this.radius);
        this.target = add(this.eye, this.axes[2], this.distance);
    }

    // No camera in the file: look at the scene centre from 2.5 radii, slightly from above.
    setDefault() {
        const side = normalise(Math.abs(this.up[0]) < 0.9 ? cross(this.up, [1, 0, 0]) : cross(this.up, [0, 1, 0]));
        const eye = add(add(this.center, side, 2.5 * this.radius), this.up, 0.8 * this.radius);
        const forward = normalise(add(this.center, eye, -1));
        const right = normalise(cross(forward, this.up));
        this.axes = [right, cross(forward, right), forward];
        this.eye = eye;
        this.distance = Math.hypot(...add(this.center, eye, -1));
        this.target = this.center;
    }

    // Drag by (dx, dy) pixels: the scene turns with the pointer, about the world's up and the camera's right.
    orbit(dx, dy) {
        const turn = (axis, angle) => {
            const axes = this.axes.map((v) => rotateAbout(v, axis, angle));
            return { axes, eye: add(this.target, rotateAbout(add(this.eye, this.target, -1), axis, angle)) };
        };
        let next = turn(this.up, -dx * 0.008);
        Object.assign(this, next);
        next = turn(this.axes[0], dy * 0.008);
        if (Math.abs(dot(next.axes[2], this.up)) < 0.995) Object.assign(this, next);  // never over the pole
    }

    pan(dx, dy, focal) {
        const step = add(scale(this.axes[0], -dx * this.distance / focal), this.axes[1], -dy * this.distance / focal);
        this.eye = add(this.eye, step);
        this.target = add(this.target, step);
    }

    zoom(factor) {
        this.distance = Math.max(this.distance * factor, 1e-3 * this.radius);
        this.eye = add(this.target, this.axes[2], -this.distance);
    }

    // {rotation (row-major 3x3), translation, eye}
    pose() {
        const rotation = [...this.axes[0], ...this.axes[1], ...this.axes[2]];
        const translation = this.axes.map((axis) => -dot(axis, this.eye));
        return { rotation, translation, eye: this.eye };
    }
}

// -- the WebGL2 renderer -----------------------------------------------------------------------------------------

class SplatRenderer {
    constructor(canvas) {
        this.gl = canvas.getContext("webgl2", {
            antialias: false, alpha: false, depth: false, stencil: false, premultipliedAlpha: true, preserveDrawingBuffer: false,
            powerPreference: "high-performance",
        });
        if (!this.gl) throw new PlayerFileError("This browser gives no WebGL2 context, which the player needs (enable hardware acceleration).");
    }

    setScene(header, words) {
        const gl = this.gl;
        this.dispose();
        this.header = header;
        const texels = header.count * header.stride / 4;
        const width = Math.min(4096, gl.getParameter(gl.MAX_TEXTURE_SIZE));
        const height = Math.ceil(texels / width);
        if (height > gl.getParameter(gl.MAX_TEXTURE_SIZE)) {
            throw new PlayerFileError(`The scene is too large for this GPU's textures (${header.count} Gaussians).`);
        }
        const padded = new Uint32Array(width * height * 4);
        padded.set(words);
        this.texture = gl.createTexture();
        gl.bindTexture(gl.TEXTURE_2D, this.texture);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32UI, width, height, 0, gl.RGBA_INTEGER, gl.UNSIGNED_INT, padded);
        this.program = this.compile(vertexShader(header, width), FRAGMENT_SHADER);
        this.uniforms = {};
        for (const name of ["u_data", "u_rotation", "u_translation", "u_eye", "u_intrinsics", "u_viewport", "u_time",
            "u_position_basis", "u_rotation_basis"]) {
            this.uniforms[name] = gl.getUniformLocation(this.program, name);
        }
        this.vao = gl.createVertexArray();
        gl.bindVertexArray(this.vao);
        this.order = gl.createBuffer();
        gl.bindBuffer(gl.ARRAY_BUFFER, this.order);
        gl.bufferData(gl.ARRAY_BUFFER, header.count * 4, gl.DYNAMIC_DRAW);
        const location = gl.getAttribLocation(this.program, "a_index");
        gl.enableVertexAttribArray(location);
        gl.vertexAttribIPointer(location, 1, gl.UNSIGNED_INT, 0, 0);
        gl.vertexAttribDivisor(location, 1);
        gl.bindVertexArray(null);
        this.drawn = 0;
    }

    compile(vertexSource, fragmentSource) {
        const gl = this.gl;
        const program = gl.createProgram();
        for (const [type, source] of [[gl.VERTEX_SHADER, vertexSource], [gl.FRAGMENT_SHADER, fragmentSource]]) {
            const shader = gl.createShader(type);
            gl.shaderSource(shader, source);
            gl.compileShader(shader);
            if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) {
                throw new Error(`shader compilation failed: ${gl.getShaderInfoLog(shader)}`);
            }
            gl.attachShader(program, shader);
            gl.deleteShader(shader);
        }
        gl.linkProgram(program);
        if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(`shader linking failed: ${gl.getProgramInfoLog(program)}`);
        return program;
    }

    setOrder(order, drawn) {
        const gl = this.gl;
        gl.bindBuffer(gl.ARRAY_BUFFER, this.order);
        gl.bufferSubData(gl.ARRAY_BUFFER, 0, order, 0, drawn);
        this.drawn = drawn;
    }

    // camera: {rotation (row-major 3x3), translation, eye, fx, fy, cx, cy}; the viewport is the canvas's size.
    draw(camera, time, basis, background) {
        const gl = this.gl;
        const width = gl.drawingBufferWidth, height = gl.drawingBufferHeight;
        gl.viewport(0, 0, width, height);
        gl.clearColor(background[0], background[1], background[2], 1);
        gl.clear(gl.COLOR_BUFFER_BIT);
        if (!this.program || !this.drawn) return;
        gl.useProgram(this.program);
        gl.activeTexture(gl.TEXTURE0);
        gl.bindTexture(gl.TEXTURE_2D, this.texture);
        const u = this.uniforms;
        gl.uniform1i(u.u_data, 0);
        gl.uniformMatrix3fv(u.u_rotation, true, camera.rotation);  // row-major in, transposed by WebGL2
        gl.uniform3fv(u.u_translation, camera.translation);
        gl.uniform3fv(u.u_eye, camera.eye);
        gl.uniform4f(u.u_intrinsics, camera.fx, camera.fy, camera.cx, camera.cy);
        gl.uniform2f(u.u_viewport, width, height);
        gl.uniform1f(u.u_time, time);
        if (basis.position.length) gl.uniform1fv(u.u_position_basis, basis.position);
        if (basis.rotation.length) gl.uniform1fv(u.u_rotation_basis, basis.rotation);
        gl.enable(gl.BLEND);
        gl.blendFuncSeparate(gl.ONE, gl.ONE_MINUS_SRC_ALPHA, gl.ONE, gl.ONE_MINUS_SRC_ALPHA);
        gl.bindVertexArray(this.vao);
        gl.drawArraysInstanced(gl.TRIANGLE_STRIP, 0, 4, this.drawn);
        gl.bindVertexArray(null);
    }

    dispose() {
        const gl = this.gl;
        if (this.texture) gl.deleteTexture(this.texture);
        if (this.program) gl.deleteProgram(this.program);
        if (this.order) gl.deleteBuffer(this.order);
        if (this.vao) gl.deleteVertexArray(this.vao);
        this.texture = this.program = this.order = this.vao = null;
    }
}

// -- the player: canvas, controls, render loop ------------------------------------------------------------------

const STYLE = `
.mv4d-player { outline: none; position: relative; display: flex; flex-direction: column; width: 100%; height: 100%; min-height: 200px;
  background: #202020; color: #ddd; font: 12px sans-serif; box-sizing: border-box; overflow: hidden; }
.mv4d-player-view { position: relative; flex: 1 1 auto; min-height: 0; }
.mv4d-player-view canvas { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; touch-action: none;
  cursor: grab; display: block; }
.mv4d-player-message { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center; padding: 12px;
  text-align: center; background: #202020; white-space: pre-wrap; line-height: 1.4; }
.mv4d-player-message.mv4d-player-error { color: #f0a0a0; }
.mv4d-player-controls { display: flex; flex-wrap: wrap; gap: 4px 6px; align-items: center; padding: 4px; flex: 0 0 auto; }
.mv4d-player-controls input[type=range] { flex: 1 1 120px; min-width: 80px; }
.mv4d-player-controls input[type=number] { width: 3.5em; }
.mv4d-player-controls button, .mv4d-player-controls select, .mv4d-player-controls input { font: inherit; color: inherit;
  background: #333; border: 1px solid #555; border-radius: 3px; padding: 1px 4px; }
.mv4d-player-stats { opacity: 0.7; flex: 1 0 100%; }
`;

function injectStyle(document) {
    if (document.getElementById("mv4d-player-style")) return;
    const style = document.createElement("style");
    style.id = "mv4d-player-style";
    style.textContent = STYLE;
    document.head.appendChild(style);
}

function element(tag, properties = {}, children = []) {
    const node = Object.assign(document.createElement(tag), properties);
    for (const child of children) node.appendChild(child);
    return node;
}

export class Mv4dPlayer {
    // root: an element the player fills. options: {maxGaussians, sortIntervalMs}
    constructor(root, options = {}) {
        injectStyle(root.ownerDocument);
        this.root = root;
        this.options = { maxGaussians: 0, sortIntervalMs: 0, ...options };
        root.classList.add("mv4d-player");
        this.canvas = element("canvas");
        this.message = element("div", { className: "mv4d-player-message", textContent: "Run the workflow to see the 4D Gaussians here." });
        this.view = element("div", { className: "mv4d-player-view" }, [this.canvas, this.message]);
        this.controls = this.buildControls();
        root.append(this.view, this.controls);
        this.state = { status: "empty", error: null, frame: 0, frames: 0, playing: false, drawn: 0, budgetFull: false, count: 0, sortMs: null, sorts: 0 };
        this.exact = null;  // {fx, fy, cx, cy, width, height} when a camera with its own intrinsics was set
        this.sortRequested = null;  // the key of the sort in flight
        this.sortedKey = null;  // the key of the order on the GPU
        this.lastSortAt = -Infinity;
        this.dirty = true;
        this.destroyed = false;
        this.listen();
        this.resizeObserver = new ResizeObserver(() => this.resize());
        this.resizeObserver.observe(this.view);
    }

    buildControls() {
        this.playButton = element("button", { textContent: "▶", title: "Play / pause", disabled: true });
        this.slider = element("input", { type: "range", min: 0, max: 0, step: 1, value: 0, title: "Frame", disabled: true });
        this.frameLabel = element("span", { textContent: "frame –" });
        this.fpsInput = element("input", { type: "number", min: 1, max: 60, step: 1, value: 12, title: "Frames per second" });
        this.budgetSelect = element("select", { title: "Gaussians drawn at most (the largest and most opaque visible ones)" },
            BUDGETS.map((value) => element("option", { value, textContent: value ? `${value / 1000}k Gaussians` : "all Gaussians" })));
        this.sortSelect = element("select", { title: "How often the worker re-sorts the Gaussians by depth" },
            SORT_INTERVALS.map((value) => element("option", { value, textContent: value ? `sort ≤ ${1000 / value}/s` : "sort on every change" })));
        this.resetButton = element("button", { textContent: "Reset view", title: "Back to the scene's first camera" });
        this.stats = element("span", { className: "mv4d-player-stats" });
        this.budgetSelect.value = String(this.options.maxGaussians);
        this.sortSelect.value = String(this.options.sortIntervalMs);
        return element("div", { className: "mv4d-player-controls" }, [this.playButton, this.slider, this.frameLabel, this.fpsInput,
            this.budgetSelect, this.sortSelect, this.resetButton, this.stats]);
    }

    listen() {
        const stop = (event) => event.stopPropagation();  // the graph canvas must not pan or zoom under the player
        // ComfyUI 1.47's Vue nodes forward the wheel to the graph unless it happens inside a focused element
        // marked data-capture-wheel (as its own 3D viewer does): the player takes the focus on a click
        this.root.tabIndex = -1;
        this.root.dataset.captureWheel = "true";
        this.root.addEventListener("pointerdown", () => this.root.focus({ preventScroll: true }), true);
        for (const type of ["pointerdown", "pointermove", "pointerup", "wheel", "contextmenu", "dblclick", "keydown"]) {
            this.root.addEventListener(type, stop);
        }
        this.playButton.addEventListener("click", () => (this.state.playing ? this.pause() : this.play()));
        this.slider.addEventListener("input", () => this.setFrame(Number(this.slider.value)));
        this.fpsInput.addEventListener("change", () => { this.fps = Math.min(60, Math.max(1, Number(this.fpsInput.value) || 12)); });
        this.budgetSelect.addEventListener("change", () => { this.options.maxGaussians = Number(this.budgetSelect.value); this.touch(); });
        this.sortSelect.addEventListener("change", () => { this.options.sortIntervalMs = Number(this.sortSelect.value); this.touch(); });
        this.resetButton.addEventListener("click", () => this.resetView());

        let drag = null;
        this.canvas.addEventListener("contextmenu", (event) => event.preventDefault());
        this.canvas.addEventListener("webglcontextlost", (event) => {
            event.preventDefault();
            this.fail(new PlayerFileError("The browser took the player's WebGL context back (too many WebGL views, or the GPU " +
                "was reset). Run the workflow again, or reload the page."));
        });
        this.canvas.addEventListener("pointerdown", (event) => {
            if (!this.camera) return;
            this.canvas.setPointerCapture(event.pointerId);
            drag = { x: event.clientX, y: event.clientY, pan: event.button !== 0 || event.shiftKey };
            this.canvas.style.cursor = "grabbing";
        });
        this.canvas.addEventListener("pointermove", (event) => {
            if (!drag) return;
            const ratio = this.canvas.width / Math.max(this.canvas.clientWidth, 1);
            const dx = (event.clientX - drag.x) * ratio, dy = (event.clientY - drag.y) * ratio;
            drag.x = event.clientX;
            drag.y = event.clientY;
            if (drag.pan) this.camera.pan(dx, dy, this.intrinsics().fy);
            else this.camera.orbit(dx / ratio, dy / ratio);
            this.touch();
        });
        const end = () => { drag = null; this.canvas.style.cursor = "grab"; };
        this.canvas.addEventListener("pointerup", end);
        this.canvas.addEventListener("pointercancel", end);
        this.canvas.addEventListener("wheel", (event) => {
            if (!this.camera) return;
            event.preventDefault();
            this.camera.zoom(Math.exp(Math.max(-100, Math.min(100, event.deltaY)) * 0.002));
            this.touch();
        }, { passive: false });
    }

    showMessage(text, isError = false) {
        this.message.textContent = text;
        this.message.classList.toggle("mv4d-player-error", isError);
        this.message.style.display = text ? "flex" : "none";
    }

    fail(error) {
        this.state.status = "error";
        this.state.error = error.message;
        this.pause();
        const known = error instanceof PlayerFileError;
        this.showMessage(known ? error.message : `The player failed: ${error.message}`, true);
        if (!known) console.warn("mv4d player:", error);
    }

    // Fetch and show a .mv4dweb file.
    async load(url, name = url) {
        const ticket = (this.loadTicket = (this.loadTicket ?? 0) + 1);
        this.state.status = "loading";
        this.state.error = null;
        this.showMessage("Loading the 4D Gaussians…");
        let buffer;
        try {
            const response = await fetch(url);
            if (!response.ok) {
                throw new PlayerFileError(`Could not load the preview file (HTTP ${response.status}). If the server restarted, ` +
                    "its temporary files are gone: run the workflow again.");
            }
            buffer = await this.readWithProgress(response, ticket);
        } catch (error) {
            if (ticket === this.loadTicket) this.fail(error instanceof PlayerFileError ? error : new PlayerFileError(`Could not load the preview file: ${error.message}`));
            return;
        }
        if (ticket === this.loadTicket) this.loadBuffer(buffer, name);
    }

    async readWithProgress(response, ticket) {
        const total = Number(response.headers.get("Content-Length")) || 0;
        if (!response.body || !total) return response.arrayBuffer();
        const reader = response.body.getReader();
        const bytes = new Uint8Array(total);
        let received = 0;
        for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            if (received + value.length > total) return new Blob([bytes.subarray(0, received), value]).arrayBuffer();  // length lied
            bytes.set(value, received);
            received += value.length;
            if (ticket === this.loadTicket) this.showMessage(`Loading the 4D Gaussians… ${Math.round(100 * received / total)}%`);
        }
        return received === total ? bytes.buffer : bytes.slice(0, received).buffer;
    }

    // Show a .mv4dweb file already in memory (the standalone page embeds one).
    loadBuffer(buffer, name = "") {
        const previousCameras = this.header ? JSON.stringify(this.header.cameras?.[0]) : undefined;
        let header;
        try {
            let words;
            ({ header, words } = parsePlayerFile(buffer));
            this.renderer ??= new SplatRenderer(this.canvas);
            this.renderer.setScene(header, words);
            this.header = header;
            this.name = name;
            this.startWorker(header, words);
        } catch (error) {
            this.fail(error);
            return;
        }
        const frames = Math.max(this.header.frame_times.length, 1);
        Object.assign(this.state, { status: "ready", error: null, frames, frame: 0, count: this.header.count, sorts: 0,
            readyAt: performance.now(), firstOrderAt: null });
        this.slider.max = String(frames - 1);
        this.slider.disabled = this.playButton.disabled = frames < 2;
        this.fps = this.header.fps || 12;
        this.fpsInput.value = String(this.fps);
        this.background = this.header.background ?? [1, 1, 1];
        // a new result of the same scene (same first camera) keeps the view the user chose
        const sameRig = previousCameras !== undefined && JSON.stringify(header.cameras?.[0]) === previousCameras;
        if (!sameRig || !this.camera) this.resetView();
        this.showMessage("");
        this.setFrame(0);
    }

    startWorker(header, words) {
        this.worker?.terminate();
        this.sortRequested = this.sortedKey = null;
        const worker = (this.worker = startSortWorker());
        worker.onmessage = ({ data }) => {
            if (worker !== this.worker) return;
            if (data.type === "order") this.receiveOrder(data);
            else if (data.type === "error") this.fail(new Error(`sorting failed: ${data.message}`));
        };
        worker.onerror = (event) => this.fail(new Error(`the sort worker failed: ${event.message}`));
        // the file's buffer moves to the worker: the texture holds the GPU's copy
        worker.postMessage({
            type: "scene", words, stride: header.stride, fields: header.fields,
            positionTerms: header.motion.position_degree + 2 * header.motion.fourier_terms, temporal: !!header.motion.temporal_opacity,
        }, [words.buffer]);
    }

    // The scene's first camera (or a view of the whole scene), with intrinsics fitted to the canvas.
    resetView() {
        if (!this.header) return;
        this.camera = new OrbitCamera(this.header.view ?? {});
        const first = this.header.cameras?.[0];
        if (first) this.camera.setFromMatrix(first.world_to_camera);
        else this.camera.setDefault();
        this.exact = null;
        this.canvas.style.objectFit = "fill";
        this.resize();
        this.touch();
    }

    // Look through a camera given as the file's cameras are ({world_to_camera: 16 numbers row-major, fx, fy,
    // cx, cy, width, height}): the canvas then renders width x height pixels with exactly these intrinsics.
    setCamera(camera) {
        if (!this.header) throw new Error("no scene loaded");
        this.camera = new OrbitCamera(this.header.view ?? {});
        this.camera.setFromMatrix(camera.world_to_camera);
        this.exact = { fx: camera.fx, fy: camera.fy, cx: camera.cx, cy: camera.cy, width: camera.width, height: camera.height };
        this.canvas.width = camera.width;
        this.canvas.height = camera.height;
        this.canvas.style.objectFit = "contain";
        this.touch();
    }

    setFrame(frame) {
        const frames = this.state.frames || 1;
        this.state.frame = ((Math.round(frame) % frames) + frames) % frames;
        this.frameClock = this.state.frame;
        this.slider.value = String(this.state.frame);
        this.touch();
    }

    play() {
        if (this.state.frames < 2) return;
        this.state.playing = true;
        this.playButton.textContent = "❚❚";
        this.lastTick = null;
        this.touch();
    }

    pause() {
        this.state.playing = false;
        this.playButton.textContent = "▶";
    }

    time() {
        return this.header?.frame_times?.[this.state.frame] ?? 0;
    }

    resize() {
        if (this.exact || this.destroyed) return;
        const ratio = Math.min(window.devicePixelRatio || 1, 2);
        const width = Math.max(1, Math.round(this.view.clientWidth * ratio)), height = Math.max(1, Math.round(this.view.clientHeight * ratio));
        if (this.canvas.width !== width || this.canvas.height !== height) {
            this.canvas.width = width;
            this.canvas.height = height;
        }
        this.touch();
    }

    // Pixel intrinsics for the canvas: the exact ones set by setCamera, else the first camera's field of view
    // fitted inside the canvas (principal point centred), else a 40 degree vertical field of view.
    intrinsics() {
        if (this.exact) return this.exact;
        const width = this.canvas.width, height = this.canvas.height;
        const first = this.header?.cameras?.[0];
        if (!first) {
            const f = height / 2 / Math.tan((20 * Math.PI) / 180);
            return { fx: f, fy: f, cx: width / 2, cy: height / 2 };
        }
        const s = Math.min(width / first.width, height / first.height);
        return { fx: first.fx * s, fy: first.fy * s, cx: width / 2 + (first.cx - first.width / 2) * s, cy: height / 2 + (first.cy - first.height / 2) * s };
    }

    sortKey() {
        const pose = this.camera.pose();
        return JSON.stringify([pose.rotation.slice(6, 9), pose.translation[2], this.state.frame, this.options.maxGaussians]);
    }

    requestSort(now) {
        if (!this.worker || this.sortRequested !== null || !this.camera) return;
        const key = this.sortKey();
        if (key === this.sortedKey || now - this.lastSortAt < this.options.sortIntervalMs) return;
        this.sortRequested = key;
        this.lastSortAt = now;
        this.worker.postMessage(this.sortMessage(key));
    }

    // What the worker needs for the current camera and frame: the depth row of the camera, the motion basis.
    sortMessage(id) {
        const pose = this.camera.pose();
        const time = this.time();
        return {
            type: "sort", id, row: [...pose.rotation.slice(6, 9), pose.translation[2]],
            basis: timeBasis(this.header.motion, time).position, time, budget: this.options.maxGaussians,
        };
    }

    receiveOrder({ id, order, drawn, complete, ms }) {
        this.sortRequested = null;
        if (!this.renderer || this.state.status !== "ready") return;
        this.renderer.setOrder(order, drawn);
        this.sortedKey = id;
        Object.assign(this.state, { drawn, budgetFull: !complete, sortMs: ms, sorts: this.state.sorts + 1 });
        this.state.firstOrderAt ??= performance.now();
        this.touch();
    }

    // Something the picture depends on changed: draw at the next animation frame.
    touch() {
        this.dirty = true;
        this.schedule();
    }

    schedule() {
        if (!this.frameRequested && !this.destroyed) {
            this.frameRequested = true;
            requestAnimationFrame((now) => this.tick(now));
        }
    }

    tick(now) {
        this.frameRequested = false;
        if (this.destroyed || this.state.status !== "ready") return;
        if (this.state.playing) {
            if (this.lastTick !== null) this.frameClock += ((now - this.lastTick) / 1000) * this.fps;
            this.lastTick = now;
            const frame = Math.floor(this.frameClock) % this.state.frames;
            this.frameClock %= this.state.frames;
            if (frame !== this.state.frame) {
                this.state.frame = frame;
                this.slider.value = String(frame);
                this.dirty = true;
            }
        }
        this.requestSort(now);
        if (this.dirty) this.draw(now);
        if (this.state.playing || this.sortedKey !== this.sortKey()) this.schedule();  // a sort to request or to wait for
    }

    draw(now = performance.now()) {
        this.dirty = false;
        const pose = this.camera.pose();
        const time = this.time();
        this.renderer.draw({ ...pose, ...this.intrinsics() }, time, timeBasis(this.header.motion, time), this.background);
        if (this.lastDraw !== undefined) this.drawInterval = 0.9 * (this.drawInterval ?? now - this.lastDraw) + 0.1 * (now - this.lastDraw);
        this.lastDraw = now;
        this.frameLabel.textContent = `frame ${this.state.frame + 1} / ${this.state.frames} · t ${time.toFixed(3)}`;
        const s = this.state;
        const sort = s.sortMs === null ? "" : ` · sort ${s.sortMs.toFixed(1)} ms`;
        const budget = s.budgetFull ? ", the budget" : "";
        this.stats.textContent = `${s.drawn.toLocaleString("en")} Gaussians drawn${budget} (${s.count.toLocaleString("en")} in all)${sort}`;
    }

    // Resolves once the picture shown is sorted for the current camera and frame.
    settled(timeoutMs = 30000) {
        const started = performance.now();
        return new Promise((resolve, reject) => {
            const check = () => {
                if (this.state.status === "error") return reject(new Error(this.state.error));
                if (this.state.status === "ready" && this.sortedKey === this.sortKey() && !this.dirty) return resolve(this.state);
                if (performance.now() - started > timeoutMs) return reject(new Error("the player did not settle"));
                setTimeout(check, 10);
            };
            check();
        });
    }

    // A PNG data URL of exactly what the canvas shows, once settled.
    async capture() {
        await this.settled();
        this.draw();  // the drawing buffer is read in the same task as it is drawn
        return this.canvas.toDataURL("image/png");
    }

    destroy() {
        this.destroyed = true;
        this.worker?.terminate();
        this.resizeObserver.disconnect();
        this.renderer?.dispose();
        this.renderer?.gl.getExtension("WEBGL_lose_context")?.loseContext();
    }
}
