// How numbers, sizes, times and durations read on the page.

const nf = new Intl.NumberFormat();

/** 12 345 */
export const count = (n) => (n === null || n === undefined ? '–' : nf.format(n));

/** 1.5 MB (decimal units, as `ls -h --si` and disk makers count). */
export function bytes(n) {
    if (n === null || n === undefined) {
        return '–';
    }
    const units = ['B', 'kB', 'MB', 'GB', 'TB'];
    let v = n;
    let u = 0;
    while (v >= 1000 && u < units.length - 1) {
        v /= 1000;
        u += 1;
    }
    return `${u === 0 ? v : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[u]}`;
}

/** 85 ms, 1.25 s */
export function ms(n) {
    if (n === null || n === undefined) {
        return '–';
    }
    return n < 1000 ? `${Math.round(n)} ms` : `${(n / 1000).toFixed(2)} s`;
}

/** 3 s, 4 min, 2 h 5 min, 3 d */
export function duration(seconds) {
    if (seconds === null || seconds === undefined) {
        return '–';
    }
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) {
        return `${s} s`;
    }
    if (s < 3600) {
        return `${Math.floor(s / 60)} min`;
    }
    if (s < 86400) {
        const m = Math.floor((s % 3600) / 60);
        return `${Math.floor(s / 3600)} h${m ? ` ${m} min` : ''}`;
    }
    return `${Math.floor(s / 86400)} d`;
}

/** "12 s ago" from Unix seconds. */
export function ago(unixSeconds) {
    if (!unixSeconds) {
        return '–';
    }
    return `${duration(Date.now() / 1000 - unixSeconds)} ago`;
}

/** 14:03:22 from Unix milliseconds. */
export function clock(unixMs) {
    return new Date(unixMs).toLocaleTimeString([], { hour12: false });
}

/** 2026-12-03 14:03 from Unix seconds, in local time. */
export function when(unixSeconds) {
    if (!unixSeconds) {
        return '–';
    }
    const d = new Date(unixSeconds * 1000);
    const pad = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** The last path component of a file path. */
export const basename = (p) => String(p ?? '').split('/').filter(Boolean).pop() ?? '';
