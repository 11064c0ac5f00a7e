-- Orthanc routing for discgeo: when a study becomes stable, send its MR series to the discgeo gateway
-- (DICOM modality "discgeo") if it holds MR instances not routed yet. The SEG and SR the gateway sends
-- back make the study stable again without new MR instances: nothing is sent then. A new MR series
-- (or a late instance) is routed again; the gateway stores only instances it does not have and
-- processes the study as a new revision. `routed` is lost on restart: a repeated send is harmless,
-- the gateway deduplicates by SOPInstanceUID.
routed = {}

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local mr, count = {}, 0
  for _, s in ipairs(series) do
    if s['MainDicomTags']['Modality'] == 'MR' then
      table.insert(mr, s['ID'])
      count = count + #s['Instances']
    end
  end
  if count > 0 and routed[studyId] ~= count then
    routed[studyId] = count
    print('discgeo: routing ' .. count .. ' MR instance(s) of stable study ' .. studyId .. ' to the gateway')
    RestApiPost('/modalities/discgeo/store', DumpJson(mr))
  end
end
