// Small formatting helpers shared by the toasts and the popups.

/** "03/12/2026, 14:02:31 (5 min ago)" for Unix seconds. */
export function when(seconds) {
    const date = new Date(seconds * 1000);
    const minutes = Math.floor((Date.now() - date.getTime()) / 60_000);
    let ago;
    if (minutes < 1) {
        ago = 'just now';
    } else if (minutes < 120) {
        ago = `${minutes} min ago`;
    } else if (minutes < 48 * 60) {
        ago = `${Math.round(minutes / 60)} h ago`;
    } else {
        ago = `${Math.round(minutes / 1440)} days ago`;
    }
    return `${date.toLocaleString()} (${ago})`;
}

/** An element with properties and children (null children skipped). */
export function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children.filter(c => c !== null && c !== undefined));
    return node;
}
