import assert from 'node:assert/strict';
import { test } from 'node:test';

import { readMessages } from '../events.js';

/** A ReadableStream of bytes delivering `chunks` one by one. */
function stream(chunks) {
    const enc = new TextEncoder();
    return new ReadableStream({
        start(c) {
            for (const chunk of chunks) {
                c.enqueue(enc.encode(chunk));
            }
            c.close();
        },
    });
}

test('SSE messages split across chunks, comments skipped, CRLF accepted', async () => {
    const got = [];
    await readMessages(stream([
        ': kvgate events\n\n',
        'data: {"type":"saved","seq":1}\n',
        '\ndata: {"type":"resto',
        'red","seq":2}\r\n\r\n: keepalive\n\n',
        'data: {"a":\ndata: 1}\n\n',
        'data: {"partial": true}', // no end: not a message
    ]), (d) => got.push(d));
    assert.deepEqual(got, ['{"type":"saved","seq":1}', '{"type":"restored","seq":2}', '{"a":\n1}']);
});
